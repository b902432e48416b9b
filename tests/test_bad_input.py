"""Contract §8 guarantee 5 over MQTT: over a thousand malformed messages on every ingress topic and on
R/request, against both brokers. The gateway keeps serving valid traffic interleaved with them, counts
each rejection with its reason, keeps the rejection log, and commits nothing because of them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import GatewayConfig
from gateway.mqtt.link import Incoming
from gateway.services.ingress import Ingress
from gateway.store.audit import audit
from gateway.store.reads import ReadStore
from gateway.store.schema import db_path
from tests.conftest import MosquittoProcess, free_port
from tests.harness import Observer, R, observer, running, site_config
from tests.helpers import new_writer, reader

SEED = 20261125
MB = 1 << 20
REASONS = {
    "too_large", "invalid_utf8", "invalid_json", "not_an_object", "missing_field", "wrong_type", "out_of_range",
    "bad_device_id", "bad_event_id", "bad_plate", "bad_timestamp", "ts_out_of_range", "device_mismatch",
    "too_many_candidates", "unknown_device",
}  # fmt: skip
UNKNOWN_SENSORS = ("ZZ-001", "ZZ-002", "nope")
UNKNOWN_CAMERAS = ("cam-zz", "cam-in9")
TS_1970 = "1970-01-01T00:00:00Z"
TS_2100 = "2100-01-01T00:00:00Z"
MS_2100 = 4_102_444_800_000


@dataclass(frozen=True)
class Bad:
    """A device message that must be rejected; `reason` is checked when a hand-picked case names it."""

    topic: str
    payload: bytes
    kind: str
    reason: str | None = None


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()


def sensor_ok(occupied: bool = True, **extra: Any) -> dict[str, Any]:
    return {"occupied": occupied, "ts": iso_now(), "seq": 5, "battery": 3.6, **extra}


def tts_ok(device: str, occupied: bool = True, f_cnt: int = 3) -> dict[str, Any]:
    return {
        "end_device_ids": {"device_id": device, "application_ids": {"application_id": "parking"}},
        "received_at": iso_now(),
        "uplink_message": {"f_cnt": f_cnt, "decoded_payload": {"occupied": occupied, "battery": 3.6}},
    }


def cam_ok(event_id: str = "ev-1", plate: str = "AB 123 CD") -> dict[str, Any]:
    return {"event_id": event_id, "plate": plate, "confidence": 0.9, "ts": iso_now(), "candidates": ["AB123CO"]}


def pr_ok(camera: str = "cam-in1", plate: str = "pr123") -> dict[str, Any]:
    return {
        "hook": {"target": "http://x", "id": camera, "event": "recognition"},
        "data": {"camera_id": camera, "timestamp": iso_now(), "filename": "f.jpg",
                 "results": [{"plate": plate, "score": 0.9, "candidates": [{"plate": plate, "score": 0.9}]}]},
    }  # fmt: skip


# Topics of configured devices: bad payloads there must not disturb the real sensor's debounce either.
TOPICS = {
    "sensors": ("sensors/A-004/state", "sensors/A-005/state"),
    "tts": ("v3/parking@ttn/devices/A-006/up",),
    "cameras": ("cameras/cam-in1/reads", "cameras/cam-out1/reads"),
    "platerecognizer": ("cameras/cam-in1/platerecognizer", "cameras/cam-out1/platerecognizer"),
}


def hand_picked() -> list[Bad]:
    """One case per way in which a payload can be wrong, each with the reason it must be counted under."""
    s, t, c, p = (TOPICS[k][0] for k in ("sensors", "tts", "cameras", "platerecognizer"))
    tts_dev = "A-006"
    cases: list[Bad] = []

    def add(kind: str, topic: str, payload: bytes | dict[str, Any] | list[Any], reason: str) -> None:
        cases.append(Bad(topic, payload if isinstance(payload, bytes) else dumps(payload), kind, reason))

    for kind, topic in (("sensors", s), ("tts", t), ("cameras", c), ("platerecognizer", p)):
        add(kind, topic, b"", "invalid_json")
        add(kind, topic, b"{not json", "invalid_json")
        add(kind, topic, b'{"occupied": tru', "invalid_json")
        add(kind, topic, b"\xff\xfe\x00garbage", "invalid_utf8")
        add(kind, topic, b"[" * 60_000, "invalid_json")  # under the size cap: the nesting is the fault
        add(kind, topic, b'{"x": ' + b"9" * 5000 + b"}", "invalid_json")  # past Python's int digit limit
        add(kind, topic, b'{"x": 1e400}', "invalid_json")
        add(kind, topic, b'{"x": NaN}', "invalid_json")
        add(kind, topic, b'{"x": -Infinity}', "invalid_json")
        add(kind, topic, b"x" * (64 * 1024 + 1), "too_large")
        for doc in ([], [1, 2], "occupied", 17, True, None):
            add(kind, topic, dumps(doc), "not_an_object")
        add(kind, topic, {}, "missing_field")
    # One 1 MB message per device kind proves the size guard; both brokers deliver it (amqtt 0.12 has no
    # packet size limit), and more would only slow them down.
    for kind, topics in TOPICS.items():
        add(kind, topics[0], b'{"occupied": true, "pad": "' + b"p" * MB + b'"}', "too_large")

    # JSON sensor
    not_bool: tuple[Any, ...] = ("true", 1, 0, [], {}, 1.5)
    for value in not_bool:
        add("sensors", s, {"occupied": value}, "wrong_type")
    add("sensors", s, {"occupied": None}, "missing_field")
    add("sensors", s, sensor_ok(occupied=True, ts=TS_1970), "ts_out_of_range")
    add("sensors", s, sensor_ok(occupied=True, ts=TS_2100), "ts_out_of_range")
    add("sensors", s, sensor_ok(occupied=True, ts=0), "ts_out_of_range")
    add("sensors", s, sensor_ok(occupied=True, ts=MS_2100), "ts_out_of_range")
    add("sensors", s, sensor_ok(occupied=True, ts=10**400), "ts_out_of_range")
    add("sensors", s, sensor_ok(occupied=True, ts="yesterday"), "bad_timestamp")
    add("sensors", s, sensor_ok(occupied=True, ts="2026-02-30T10:00:00Z"), "bad_timestamp")
    add("sensors", s, sensor_ok(occupied=True, ts="2026-11-25T10:00:00"), "bad_timestamp")  # no zone
    add("sensors", s, sensor_ok(occupied=True, ts=1.7e12), "bad_timestamp")
    add("sensors", s, sensor_ok(occupied=True, ts=True), "bad_timestamp")
    add("sensors", s, sensor_ok(occupied=True, seq=-1), "out_of_range")
    add("sensors", s, sensor_ok(occupied=True, seq=2**32), "out_of_range")
    add("sensors", s, sensor_ok(occupied=True, seq="7"), "wrong_type")
    add("sensors", s, sensor_ok(occupied=True, seq=7.0), "wrong_type")
    add("sensors", s, sensor_ok(occupied=True, seq=True), "wrong_type")
    add("sensors", s, sensor_ok(occupied=True, battery="full"), "wrong_type")
    add("sensors", s, sensor_ok(occupied=True, battery=10**400), "out_of_range")
    for device in UNKNOWN_SENSORS:
        add("sensors", f"sensors/{device}/state", sensor_ok(), "unknown_device")
        add("sensors", f"sensors/{device}/state", sensor_ok(occupied=False), "unknown_device")
    # Mosquitto disconnects a client whose topic holds a control character, so none is sent here.
    for device in ("a b", "x" * 129, "\u200b", "nb\u00a0sp"):
        add("sensors", f"sensors/{device}/state", sensor_ok(), "bad_device_id")

    # The Things Stack uplink
    add("tts", t, {"end_device_ids": "A-006", "uplink_message": {}}, "wrong_type")
    add("tts", t, {"uplink_message": {"decoded_payload": {"occupied": True}}}, "missing_field")
    add("tts", t, {**tts_ok(tts_dev), "uplink_message": None}, "missing_field")
    add("tts", t, {**tts_ok(tts_dev), "uplink_message": {"f_cnt": 1}}, "missing_field")
    add("tts", t, {**tts_ok(tts_dev), "uplink_message": {"decoded_payload": {"occupied": "yes"}}}, "wrong_type")
    add("tts", t, {**tts_ok(tts_dev), "uplink_message": {"decoded_payload": {}}}, "missing_field")
    add("tts", t, {**tts_ok(tts_dev), "uplink_message": {"decoded_payload": [True]}}, "wrong_type")
    add("tts", t, {**tts_ok(tts_dev), "received_at": TS_1970}, "ts_out_of_range")
    add("tts", t, {**tts_ok(tts_dev), "received_at": TS_2100}, "ts_out_of_range")
    add("tts", t, {**tts_ok(tts_dev), "received_at": 12}, "ts_out_of_range")
    add("tts", t, {**tts_ok(tts_dev), "received_at": "now"}, "bad_timestamp")
    add("tts", t, tts_ok("B-002"), "device_mismatch")
    add("tts", t, {**tts_ok(tts_dev), "end_device_ids": {"device_id": 6}}, "wrong_type")
    bad_fcnt = tts_ok(tts_dev)
    bad_fcnt["uplink_message"]["f_cnt"] = -3
    add("tts", t, bad_fcnt, "out_of_range")
    for device in UNKNOWN_SENSORS:
        add("tts", f"v3/parking@ttn/devices/{device}/up", tts_ok(device), "unknown_device")

    # JSON plate camera
    add("cameras", c, {"plate": "AB123CD"}, "missing_field")
    add("cameras", c, {"event_id": "e-x"}, "missing_field")
    add("cameras", c, {"event_id": 17, "plate": "AB123CD"}, "wrong_type")
    add("cameras", c, {"event_id": "has space", "plate": "AB123CD"}, "bad_event_id")
    add("cameras", c, {"event_id": "", "plate": "AB123CD"}, "bad_event_id")
    add("cameras", c, {"event_id": "e" * 129, "plate": "AB123CD"}, "bad_event_id")
    for plate in ("", " - ", "AB_123", "ÄÖ!", "A" * 17, "A" * 65, "AB\u0000CD"):
        add("cameras", c, cam_ok("e-bad", plate), "bad_plate")
    add("cameras", c, {**cam_ok("e-bad"), "plate": 123}, "wrong_type")
    add("cameras", c, {**cam_ok("e-bad"), "confidence": 1.5}, "out_of_range")
    add("cameras", c, {**cam_ok("e-bad"), "confidence": "high"}, "wrong_type")
    add("cameras", c, {**cam_ok("e-bad"), "candidates": "AB123CD"}, "wrong_type")
    add("cameras", c, {**cam_ok("e-bad"), "candidates": [f"AB{i}" for i in range(11)]}, "too_many_candidates")
    add("cameras", c, {**cam_ok("e-bad"), "candidates": ["??"]}, "bad_plate")
    add("cameras", c, {**cam_ok("e-bad"), "ts": TS_1970}, "ts_out_of_range")
    add("cameras", c, {**cam_ok("e-bad"), "ts": TS_2100}, "ts_out_of_range")
    add("cameras", c, {**cam_ok("e-bad"), "ts": MS_2100}, "ts_out_of_range")
    for camera in UNKNOWN_CAMERAS:
        add("cameras", f"cameras/{camera}/reads", cam_ok(f"u-{camera}"), "unknown_device")

    # Plate Recognizer Stream
    add("platerecognizer", p, {"hook": {}}, "missing_field")
    add("platerecognizer", p, {"data": []}, "wrong_type")
    data_ok: dict[str, Any] = pr_ok()["data"]
    add("platerecognizer", p, {"data": {**data_ok, "camera_id": "cam-out1"}}, "device_mismatch")
    add("platerecognizer", p, {"data": {**data_ok, "camera_id": 4}}, "wrong_type")
    add("platerecognizer", p, {"data": {**data_ok, "timestamp": None}}, "missing_field")
    add("platerecognizer", p, {"data": {**data_ok, "timestamp": 1700000000000}}, "wrong_type")
    add("platerecognizer", p, {"data": {**data_ok, "timestamp": TS_1970}}, "ts_out_of_range")
    add("platerecognizer", p, {"data": {**data_ok, "timestamp": TS_2100}}, "ts_out_of_range")
    add("platerecognizer", p, {"data": {**data_ok, "results": {"plate": "X1"}}}, "wrong_type")
    add("platerecognizer", p, {"data": {**data_ok, "results": ["X1"]}}, "wrong_type")
    add("platerecognizer", p, {"data": {**data_ok, "results": [{"score": 0.5}]}}, "missing_field")
    add("platerecognizer", p, {"data": {**data_ok, "results": [{"plate": "!!"}]}}, "bad_plate")
    add("platerecognizer", p, {"data": {**data_ok, "results": [{"plate": "X1", "score": 7}]}}, "out_of_range")
    add("platerecognizer", p, {"data": {**data_ok, "results": [{"plate": "X1", "candidates": "X2"}]}}, "wrong_type")
    add("platerecognizer", p, {"data": {**data_ok, "results": [{"plate": "X1", "candidates": ["X2"]}]}}, "wrong_type")
    add("platerecognizer", p, {"data": {**data_ok, "filename": ["f"]}}, "wrong_type")
    for camera in UNKNOWN_CAMERAS:
        add("platerecognizer", f"cameras/{camera}/platerecognizer", pr_ok(camera), "unknown_device")
    return cases


# Values of the wrong JSON type for a field, by what the field must be; none of them is null, which would
# count as absent for an optional field.
NOT_BOOL: tuple[Any, ...] = (0, 1, 2.5, "true", "", [], [True], {}, {"occupied": True})
NOT_STR: tuple[Any, ...] = (0, -1, 1.5, True, False, [], ["AB123CD"], {}, {"plate": "X"})
NOT_INT: tuple[Any, ...] = (-1, 2**32, 2**70, 1.5, "7", True, [], {})
NOT_TS: tuple[Any, ...] = (TS_1970, TS_2100, 0, MS_2100, -1, 1.5, "", "2026-13-01T00:00:00Z", True, [], {})
NOT_PLATES: tuple[Any, ...] = (0, 1.5, True, "AB123CD", {}, [123], ["??"], [None], ["A" * 17])
NOT_RESULTS: tuple[Any, ...] = (0, 1.5, True, "x", {}, ["AB123CD"], [1], [{"score": 1}], [{"plate": "-"}])


def _junk(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(7 if depth < 3 else 4)
    if pick == 0:
        return rng.randint(-(2**40), 2**40)
    if pick == 1:
        return rng.random() * 10 ** rng.randint(-5, 300)
    if pick == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if pick == 3:
        return rng.choice([None, True, False])
    if pick == 4:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(99)}": _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _broken_field(rng: random.Random, kind: str) -> dict[str, Any]:
    """A payload of the right shape with one field of a wrong type or value, plus random extra keys."""
    if kind == "sensors":
        doc = sensor_ok()
        name, pool = rng.choice([("occupied", NOT_BOOL), ("seq", NOT_INT), ("ts", NOT_TS), ("battery", NOT_STR[3:])])
        doc[name] = rng.choice(pool)
    elif kind == "tts":
        doc = tts_ok("A-006")
        where = rng.randrange(4)
        if where == 0:
            doc["uplink_message"]["decoded_payload"]["occupied"] = rng.choice(NOT_BOOL)
        elif where == 1:
            doc["uplink_message"]["f_cnt"] = rng.choice(NOT_INT)
        elif where == 2:
            doc["received_at"] = rng.choice(NOT_TS)
        else:
            doc["end_device_ids"]["device_id"] = rng.choice(NOT_STR)
    elif kind == "cameras":
        doc = cam_ok(f"r-{rng.randrange(10**6)}")
        name, pool = rng.choice([("event_id", NOT_STR), ("plate", NOT_STR), ("ts", NOT_TS), ("candidates", NOT_PLATES)])
        doc[name] = rng.choice(pool)
    else:
        doc = pr_ok()
        name, pool = rng.choice([("timestamp", NOT_STR), ("results", NOT_RESULTS), ("camera_id", NOT_STR)])
        doc["data"][name] = rng.choice(pool)
    for _ in range(rng.randrange(3)):
        doc[f"extra{rng.randrange(99)}"] = _junk(rng)
    return doc


def generated(rng: random.Random, per_kind: int) -> list[Bad]:
    """Seeded random bad payloads: byte noise, truncations, non-objects and single broken fields."""
    valid: dict[str, Callable[[], dict[str, Any]]] = {
        "sensors": sensor_ok,
        "tts": lambda: tts_ok("A-006"),
        "cameras": lambda: cam_ok(f"t-{rng.randrange(10**6)}"),
        "platerecognizer": pr_ok,
    }
    out: list[Bad] = []
    for kind, topics in TOPICS.items():
        for _ in range(per_kind):
            topic = rng.choice(topics)
            style = rng.randrange(4)
            if style == 0:
                payload = rng.randbytes(rng.randrange(1, 300))
            elif style == 1:  # a proper prefix of a compact JSON object is never valid JSON
                whole = dumps(valid[kind]())
                payload = whole[: rng.randrange(len(whole))]
            elif style == 2:
                value = _junk(rng)
                payload = dumps([value] if isinstance(value, dict) else value)
            else:
                doc = _broken_field(rng, kind)
                payload = dumps(doc)
            out.append(Bad(topic, payload, kind))
    return out


def bad_requests(rng: random.Random) -> list[tuple[str, bytes, str | None]]:
    """(verb, payload, transaction the reply must carry) for requests that must get `invalid_request`."""
    out: list[tuple[str, bytes, str | None]] = []

    def add(verb: str, doc: Any, *, unread: bool = False) -> None:
        """`unread`: rejected before the transaction is read (too large, not JSON), so the reply has none."""
        payload = doc if isinstance(doc, bytes) else dumps(doc)
        tx = doc.get("transaction") if isinstance(doc, dict) and not unread else None
        out.append((verb, payload, tx if isinstance(tx, str) else None))

    for verb in ("enter", "exit", "availability", "block", "sessions"):
        add(verb, b"")
        add(verb, b"{")
        add(verb, b"\xc3\x28")
        add(verb, b"[" * 10_000)
        add(verb, [])
        add(verb, "enter")
        add(verb, {"transaction": f"nan-{verb}", "lot": float("nan")}, unread=True)
        add(verb, b'{"transaction": "inf-' + verb.encode() + b'", "lot": Infinity}')
        add(verb, {"lot": "lot1", "vehicle": "AB1", "slot": "A-001"})  # no transaction
        add(verb, {"transaction": 7, "lot": "lot1"})
        add(verb, {"transaction": "", "lot": "lot1"})
        add(verb, {"transaction": f"extra-{verb}", "lot": "lot1", "vehicle": "AB1", "slot": "A-001", "x": 1})
        add(verb, {"transaction": f"big-{verb}", "pad": "p" * (16 * 1024)}, unread=True)
    add("enter", {"transaction": "e1", "vehicle": 7, "lot": "lot1"})
    add("enter", {"transaction": "e2", "vehicle": "AB1", "lot": ""})
    add("enter", {"transaction": "e3", "vehicle": "AB1"})
    add("enter", {"transaction": "e4", "vehicle": "AB1", "lot": "lot1", "zone": 3})
    add("enter", {"transaction": "e5", "vehicle": "A" * 200, "lot": "lot1"})
    add("exit", {"transaction": "x1", "vehicle": ["AB1"]})
    add("availability", {"transaction": "a1", "lot": None})
    add("block", {"transaction": "b1", "slot": "A-001", "reason": "r" * 300})
    add("block", {"transaction": "b2", "reason": "paint"})
    add("unblock", {"transaction": "u1", "slot": 1})
    add("sessions", {"transaction": "s1", "active": "yes"})
    add("enter", {"transaction": "big1", "pad": "p" * MB}, unread=True)
    for verb in ("fly", "reserve", "pay", "open_gate", "set_gate_mode", "cancel_reservation"):
        add(verb, {"transaction": f"v-{verb}", "gate": "in1", "reason": "x", "actor": "y"})
    for i in range(15):
        verb = rng.choice(["enter", "exit", "availability", "block", "unblock", "sessions"])
        doc = {"transaction": f"rnd-{i}", f"junk{i}": _junk(rng)}  # extra keys are forbidden
        add(verb, doc)
        add(verb, rng.randbytes(rng.randrange(1, 200)).replace(b"{", b"("))
    return out


@pytest.fixture(params=["amqtt", "mosquitto"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GatewayConfig]:
    if request.param == "amqtt":
        yield site_config(tmp_path / "state", port=free_port(), embedded=True)
    else:
        broker: MosquittoProcess = request.getfixturevalue("mosquitto")
        yield site_config(tmp_path / "state", port=broker.port, embedded=False)


def chunks(items: list[Bad], n: int) -> Iterator[list[Bad]]:
    size = -(-len(items) // n)
    for i in range(0, len(items), size):
        yield items[i : i + size]


def replies(obs: Observer) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _ in obs.messages if t.startswith(f"{R}/response/")]


async def test_malformed_input_is_counted_and_never_committed(site: GatewayConfig) -> None:
    cfg = site
    rng = random.Random(SEED)
    bad = hand_picked()
    labelled = Counter((b.kind, b.reason) for b in bad if b.reason is not None)
    bad += generated(rng, per_kind=220)
    rng.shuffle(bad)
    requests = bad_requests(rng)
    assert len(bad) + len(requests) >= 1000
    parts = list(chunks(bad, 4))
    async with running(cfg) as gw, observer(cfg.broker.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        # Valid traffic, interleaved. The sensors commit before any session exists, so their occupancy is
        # unregistered rather than a re-seat of a session on its way in.
        await obs.pub("sensors/A-003/state", {"occupied": True, "seq": 100})
        await obs.pub("v3/parking@ttn/devices/B-001/up", tts_ok("B-001", f_cnt=50))
        for b in parts[0]:
            await obs.pub(b.topic, b.payload)
        await obs.wait_for(lambda: len(obs.events("slot.status")) >= 2)
        await obs.pub("cameras/cam-in1/reads", cam_ok("ok-1", "GOOD 1"))
        for i, (verb, payload, _) in enumerate(requests):
            await obs.pub(f"{R}/request/{verb}", payload)
            if i == len(requests) // 2:
                ok = await obs.request("availability", {"lot": "lot1"})
                assert ok["status"] == "ok" and ok["data"]["total"] == 8
        await obs.pub("cameras/cam-in1/platerecognizer", pr_ok("cam-in1", "PRCAR1"))
        for b in parts[1]:
            await obs.pub(b.topic, b.payload)
        # Replays: a repeated or older seq/f_cnt is dropped by the tracker; a camera event id gets its first
        # decision again, even with another plate; a replayed Stream webhook is the same event.
        await obs.pub("sensors/A-003/state", {"occupied": False, "seq": 100})
        await obs.pub("sensors/A-003/state", {"occupied": False, "seq": 99})
        await obs.pub("v3/parking@ttn/devices/B-001/up", tts_ok("B-001", occupied=False, f_cnt=50))
        for _ in range(3):
            await obs.pub("cameras/cam-in1/reads", cam_ok("ok-1", "GOOD 1"))
        await obs.pub("cameras/cam-in1/reads", cam_ok("ok-1", "OTHER 9"))
        await obs.pub("cameras/cam-in1/platerecognizer", pr_ok("cam-in1", "PRCAR1"))
        for b in parts[2]:
            await obs.pub(b.topic, b.payload)
        await obs.pub("sensors/A-003/state", {"occupied": False, "seq": 101})
        for b in parts[3]:
            await obs.pub(b.topic, b.payload)
        await obs.pub("cameras/cam-in1/reads", cam_ok("ok-1", "GOOD 1"))

        await obs.wait_for(lambda: sum(gw.ingress.rejected.values()) >= len(bad), timeout=30)
        invalid = await obs.wait_for(
            lambda: (
                len(r := [x for x in replies(obs) if x.get("error", {}).get("code") == "invalid_request"])
                >= len(requests)
                and r
            ),
            timeout=20,
        )
        await obs.wait_for(lambda: len(obs.events("slot.status")) >= 3)
        conn = reader(cfg)
        await obs.wait_for(
            lambda: conn.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] >= len(bad), timeout=10
        )
        # a valid request after all of it is answered, and the gateway still says it is online
        sessions = await obs.request("sessions", {"lot": "lot1", "active": True})
        assert obs.state(f"{R}/status") == "online"

        # each rejection counted once, under a known reason, the hand-picked ones under theirs
        rejected = gw.ingress.rejected
        assert sum(rejected.values()) == len(bad)
        assert {reason for _, reason in rejected} <= REASONS
        for (kind, reason), n in labelled.items():
            assert rejected[(kind, reason)] >= n, (kind, reason, rejected[(kind, reason)], n)
        assert Counter(b.kind for b in bad) == Counter(
            {k: sum(n for (kk, _), n in rejected.items() if kk == k) for k in TOPICS}
        )
        # the rejection log in the store holds the same, by source kind and reason
        logged = Counter(
            (source.split("/", 1)[0], reason)
            for source, reason in conn.execute("SELECT source, reason FROM rejections")
        )
        assert logged == rejected
        # replays were seen by the tracker and dropped, not rejected
        assert gw.ingress.verdicts["duplicate"] >= 2 and gw.ingress.verdicts["out_of_order"] >= 1

        # requests: exactly the bad ones failed, each with invalid_request and its own transaction
        assert len(invalid) == len(requests)
        assert gw.requests is not None and gw.requests.invalid == len(requests)
        want_tx = Counter(tx for _, _, tx in requests)
        assert Counter(x["transaction"] for x in invalid) == want_tx

        # only the valid traffic was committed
        started = obs.events("session.started")
        assert sorted(e["slot"] for e in started) == ["A-001", "A-002"]
        assert {e["gate"] for e in started} == {"in1"}
        assert len(sessions["data"]["sessions"]) == 2
        status = [(e["slot"], e["status"]) for e in obs.events("slot.status")]
        sensed = [s for s in status if s[0] in ("A-003", "B-001")]
        assert sorted(sensed[:2]) == [("A-003", "occupied"), ("B-001", "occupied")]
        assert sensed[2:] == [("A-003", "available")]
        assert sorted(s for s in status if s not in sensed) == [("A-001", "occupied"), ("A-002", "occupied")]
        types = Counter(e["type"] for e in obs.events())
        assert set(types) == {"session.started", "session.confirmed", "slot.status", "alert"}
        assert types["session.started"] == types["session.confirmed"] == 2
        alerts = obs.events("alert")
        unknown = sorted(a["subject"]["device"] for a in alerts if a["code"] == "device.unknown")
        assert unknown == sorted({*UNKNOWN_SENSORS, *UNKNOWN_CAMERAS})  # at most once per id
        assert {a["code"] for a in alerts} == {"device.unknown", "slot.unregistered_occupancy"}
        for quiet in ("A-004", "A-005", "A-006"):  # only bad payloads ever arrived for these sensors
            assert obs.state(f"{R}/slots/{quiet}")["sensor"] == "none"
    assert audit(conn) == []
    rows = conn.execute("SELECT slot, plate FROM sessions WHERE state = 'active' ORDER BY slot").fetchall()
    assert [r[0] for r in rows] == ["A-001", "A-002"] and rows[0][1] == "GOOD1" and rows[1][1] == "PRCAR1"
    conn.close()


@st.composite
def device_messages(draw: st.DrawFn) -> Incoming:
    """A device topic with a known, unknown or odd id, and a payload anywhere from noise to nearly valid."""
    ids = st.sampled_from(["A-001", "B-001", "cam-in1", "cam-out1", "ZZ-9", "x y", ""]) | st.text(max_size=12)
    device = draw(ids.filter(lambda d: not any(c in d for c in "/+#\x00")))
    topic = draw(
        st.sampled_from(
            [f"sensors/{device}/state", f"v3/app@t/devices/{device}/up", f"cameras/{device}/reads",
             f"cameras/{device}/platerecognizer"]
        )
    )  # fmt: skip
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner))
    plates = st.from_regex(r"[A-Z0-9 -]{0,18}", fullmatch=True) | st.text(max_size=20)
    stamps = st.sampled_from([iso_now(), TS_1970, TS_2100, int(time.time() * 1000)]) | values
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "occupied": st.booleans() | values, "seq": st.integers() | values, "ts": stamps,
            "event_id": st.text(max_size=10) | values, "plate": plates, "candidates": st.lists(plates) | values,
            "confidence": st.floats() | values, "battery": st.floats() | values,
            "end_device_ids": st.fixed_dictionaries({"device_id": st.just(device) | values}) | values,
            "uplink_message": st.fixed_dictionaries(
                {"decoded_payload": st.fixed_dictionaries({"occupied": st.booleans() | values}) | values},
                optional={"f_cnt": st.integers() | values},
            ) | values,
            "data": st.fixed_dictionaries(
                {"timestamp": stamps, "results": st.lists(st.fixed_dictionaries({"plate": plates}) | values)},
                optional={"camera_id": st.just(device) | values},
            ) | values,
        },
    )  # fmt: skip
    payload = draw(
        st.binary(max_size=200)
        | shaped.map(lambda d: json.dumps(d, allow_nan=True).encode())
        | values.map(lambda v: json.dumps(v, allow_nan=True).encode())
    )
    return Incoming(topic=topic, payload=payload, qos=1, retain=False)


def test_ingress_handle_never_raises(tmp_path: Path) -> None:
    """Straight into Ingress.handle with a real writer behind it: whatever arrives, nothing escapes,
    every message ends in exactly one counter, and the store's invariants hold afterwards."""
    cfg = site_config(tmp_path / "state", port=1, embedded=False)
    loop = asyncio.new_event_loop()
    writer = new_writer(cfg)
    writer_task = loop.create_task(writer.run())
    loop.run_until_complete(writer.wait_ready())
    ingress = Ingress(cfg, writer, ReadStore(db_path(cfg.state_path())))
    try:

        @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(msg=device_messages())
        def feed(msg: Incoming) -> None:
            before = sum(ingress.rejected.values()) + sum(ingress.verdicts.values()) + ingress.accepted["camera"]
            loop.run_until_complete(ingress.handle(msg))
            after = sum(ingress.rejected.values()) + sum(ingress.verdicts.values()) + ingress.accepted["camera"]
            # a Stream webhook carries any number of reads, an empty `results` none
            assert after - before >= 1 or msg.topic.endswith("/platerecognizer")
            if not msg.topic.endswith("/platerecognizer"):
                assert after - before == 1

        feed()
        # the decisions and alerts the valid-looking reads spawned, then stop the writer
        loop.run_until_complete(asyncio.sleep(0.5))
    finally:
        writer_task.cancel()
        loop.run_until_complete(asyncio.gather(writer_task, return_exceptions=True))
        loop.close()
    conn = reader(cfg)
    assert audit(conn) == []
    conn.close()


async def test_tts_rejection_is_logged_under_its_device(tmp_path: Path) -> None:
    cfg = site_config(tmp_path / "state", port=1, embedded=False)
    writer = new_writer(cfg)
    ingress = Ingress(cfg, writer, ReadStore(db_path(cfg.state_path())))
    async with asyncio.TaskGroup() as tg:
        writer_task = tg.create_task(writer.run())
        await writer.wait_ready()
        ingress_task = tg.create_task(ingress.run())
        await ingress.handle(Incoming("v3/parking@ttn/devices/A-006/up", b"{", qos=1, retain=False))
        conn = reader(cfg)
        try:
            for _ in range(100):  # the rejection log is flushed once a second
                rows = [tuple(r) for r in conn.execute("SELECT source, reason FROM rejections")]
                if rows:
                    break
                await asyncio.sleep(0.1)
        finally:
            conn.close()
            ingress_task.cancel()
            writer_task.cancel()
    assert rows == [("tts/A-006", "invalid_json")]
