"""The gateway end to end over real brokers: the bundled amqtt one and a Mosquitto subprocess."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store.audit import audit
from gateway.store.availability import availability
from tests.conftest import MosquittoProcess, free_port
from tests.harness import R, observer, running, site_config
from tests.helpers import reader


@pytest.fixture(params=["amqtt", "mosquitto"])
async def site(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "amqtt":
        cfg = site_config(tmp_path / "state", port=free_port(), embedded=True)
        yield cfg, None
    else:
        broker = MosquittoProcess(tmp_path)
        broker.start()
        try:
            yield site_config(tmp_path / "state", port=broker.port, embedded=False), broker
        finally:
            broker.stop()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def test_camera_entry_and_exit_publish_events_and_state(site: Any) -> None:
    cfg, _ = site
    async with running(cfg), observer(cfg.broker.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        avail = await obs.wait_for(lambda: obs.state(f"{R}/lots/lot1/availability"))
        assert (avail["total"], avail["available"]) == (8, 8)
        for _ in range(3):  # repeated reads of one car: one decision
            await obs.pub("cameras/cam-in1/reads", {"event_id": "e1", "plate": "AB 123 CD", "ts": now_iso()})
        started = await obs.wait_for(lambda: obs.events("session.started"))
        assert len(started) == 1 and started[0]["slot"] == "A-001" and started[0]["gate"] == "in1"
        assert started[0]["vehicle"].startswith("v-")
        await obs.wait_for(lambda: obs.state(f"{R}/lots/lot1/availability")["available"] == 7)
        slot = obs.state(f"{R}/slots/A-001")
        assert slot["status"] == "occupied" and slot["session"] == started[0]["session_id"]
        # a misread at the exit still finds the car (confusable 8/B)
        await obs.pub(
            "cameras/cam-out1/platerecognizer",
            {"data": {"camera_id": "cam-out1", "timestamp": now_iso(), "filename": "f1.jpg",
                      "results": [{"plate": "a8123cd", "score": 0.9, "candidates": []}]}},
        )  # fmt: skip
        ended = await obs.wait_for(lambda: obs.events("session.ended"))
        assert ended[0]["session_id"] == started[0]["session_id"] and ended[0]["gate"] == "out1"
        await obs.wait_for(lambda: obs.state(f"{R}/lots/lot1/availability")["available"] == 8)
        await asyncio.sleep(0.1)
        seqs = [e["seq"] for e in obs.events()]
        assert seqs == list(range(1, len(seqs) + 1))


async def test_status_online_then_offline_on_clean_stop(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    async with observer(mosquitto.port) as obs:
        async with running(cfg):
            await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "offline", timeout=5)


async def test_sensor_transitions_are_debounced_and_committed(site: Any) -> None:
    cfg, _ = site
    async with running(cfg), observer(cfg.broker.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        await obs.pub("sensors/A-003/state", {"occupied": True, "seq": 1})
        await obs.pub("sensors/A-003/state", {"occupied": True, "seq": 1})  # duplicate
        await obs.pub(
            "v3/parking@ttn/devices/B-001/up",
            {"end_device_ids": {"device_id": "B-001"}, "received_at": now_iso(),
             "uplink_message": {"f_cnt": 7, "decoded_payload": {"occupied": True}}},
        )  # fmt: skip
        status = await obs.wait_for(lambda: len(obs.events("slot.status")) >= 2 and obs.events("slot.status"))
        assert {e["slot"] for e in status} == {"A-003", "B-001"}
        assert all(e["status"] == "occupied" and e["sensor"] == "occupied" for e in status)
        alerts = obs.events("alert")
        assert {a["code"] for a in alerts} == {"slot.unregistered_occupancy"}
        await obs.wait_for(lambda: obs.state(f"{R}/lots/lot1/availability")["occupied"] == 2)
        # An entry now skips the occupied A-003 (sensor evidence keeps it out of availability).
        reply = await obs.request("enter", {"vehicle": "CAR1", "lot": "lot1"})
        assert reply["status"] == "ok" and reply["data"]["slot"] == "A-001"
    conn = reader(cfg)
    assert audit(conn) == []
    assert availability(conn, "lot1")["occupied"] == 3


async def test_requests_reply_and_are_idempotent(site: Any) -> None:
    cfg, _ = site
    async with running(cfg), observer(cfg.broker.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        body = {"transaction": "t-1", "vehicle": "XY 111 ZZ", "lot": "lot1", "type": "ev"}
        await obs.pub(f"{R}/request/enter", body)
        await obs.pub(f"{R}/request/enter", body)
        replies = await obs.wait_for(
            lambda: len(r := [json.loads(p) for t, p, _ in obs.messages if t == f"{R}/response/enter"]) == 2 and r
        )
        assert replies[0] == replies[1] and replies[0]["data"]["slot"] == "B-001"
        assert len(obs.events("session.started")) == 1
        avail = await obs.request("availability", {"lot": "lot1", "type": "ev"})
        assert avail["data"]["total"] == 2 and avail["data"]["occupied"] == 1
        sessions = await obs.request("sessions", {"lot": "lot1", "active": True})
        assert [s["slot"] for s in sessions["data"]["sessions"]] == ["B-001"]
        bad = await obs.request("enter", {"vehicle": 7, "lot": "lot1"})
        assert bad["status"] == "error" and bad["error"]["code"] == "invalid_request"
        assert "vehicle" in bad["error"]["message"]
        full = await obs.request("enter", {"vehicle": "Q1", "lot": "nope"})
        assert full["error"]["code"] == "unknown_lot"
        health = await obs.wait_for(lambda: obs.state(f"{R}/health"))
        assert {"ts", "uptime_s", "version", "queue_depth", "outbox_backlog", "db_bytes", "devices"} <= set(health)
        later = await obs.request("reserve", {"reservation_id": "r1"})
        assert later["error"]["code"] == "invalid_request"
        blocked = await obs.request("block", {"slot": "A-001", "reason": "paint"})
        assert blocked["status"] == "ok"
        await obs.wait_for(lambda: obs.state(f"{R}/slots/A-001")["status"] == "blocked")
        out = await obs.request("exit", {"vehicle": "XY111ZZ"})
        assert out["status"] == "ok" and out["data"]["slot"] == "B-001" and out["data"]["fee"]["amount"] == 0


async def test_mqtt5_response_topic_and_correlation(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    cfg = site_config(
        tmp_path / "state", port=mosquitto.port, embedded=False, broker_extra='response_topics = ["ops/replies/#"]'
    )
    async with (
        running(cfg),
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="v5-op", protocol=aiomqtt.ProtocolVersion.V5) as c,
    ):
        await c.subscribe("ops/replies/1", qos=1)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = "ops/replies/1"
        props.CorrelationData = b"corr-42"
        await c.publish(
            f"{R}/request/availability", json.dumps({"transaction": "a1", "lot": "lot1"}), qos=1, properties=props
        )
        async with asyncio.timeout(10):
            async for m in c.messages:
                assert m.topic.value == "ops/replies/1"
                assert json.loads(m.payload)["data"]["total"] == 8
                assert m.properties is not None and getattr(m.properties, "CorrelationData", None) == b"corr-42"
                break


async def test_availability_is_coalesced_and_ends_on_the_true_state(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    topic = f"{R}/lots/lot1/availability"
    async with running(cfg), observer(mosquitto.port) as obs:
        await obs.wait_for(lambda: obs.state(topic))
        start = len(obs.messages)
        t0 = time.monotonic()
        for i in range(40):  # 40 sensor flips in quick succession, each a commit that changes availability
            slot = f"A-00{i % 6 + 1}"
            await obs.pub(f"sensors/{slot}/state", {"occupied": (i // 6) % 2 == 0, "seq": i + 1})
        conn = reader(cfg)
        await asyncio.sleep(1.5)
        elapsed = time.monotonic() - t0
        updates = [json.loads(p) for t, p, _ in obs.messages[start:] if t == topic]
        truth = availability(conn, "lot1")
        assert updates and updates[-1]["occupied"] == truth["occupied"]
        assert updates[-1]["available"] == truth["available"]
        # at most one per 500 ms (+1 for the leading edge)
        assert len(updates) <= elapsed / 0.5 + 1
        assert len(obs.events("slot.status")) > len(updates)


async def test_a_misread_reread_at_the_same_gate_is_the_same_car(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    async with running(cfg), observer(mosquitto.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        await obs.pub("cameras/cam-in1/reads", {"event_id": "r1", "plate": "AB123CD"})
        await obs.wait_for(lambda: obs.events("session.started"))
        # The next frame of the same car, read with 8 for B: within reread_window it gets the first decision.
        await obs.pub("cameras/cam-in1/reads", {"event_id": "r2", "plate": "A8123CD"})
        await obs.pub("cameras/cam-in1/reads", {"event_id": "r3", "plate": "XY999ZZ"})  # another car
        await obs.wait_for(lambda: len(obs.events("session.started")) == 2)
        await asyncio.sleep(0.3)
        assert len(obs.events("session.started")) == 2


async def test_heartbeats_touch_memory_not_the_disk(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    async with running(cfg) as gw, observer(mosquitto.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        await obs.pub("sensors/A-002/state", {"occupied": False, "seq": 1})
        await obs.wait_for(lambda: obs.events("slot.status"))
        await asyncio.sleep(0.4)  # past the debounce: the transition none -> vacant is committed
        commits = gw.writer.commits
        db = tmp_path / "state" / "gateway.db"
        wal = db.with_name("gateway.db-wal")
        size = wal.stat().st_size
        for seq in range(2, 52):
            await obs.pub("sensors/A-002/state", {"occupied": False, "seq": seq})
        await obs.wait_for(lambda: gw.ingress.verdicts["accepted"] >= 51)
        await asyncio.sleep(0.4)
        assert gw.writer.commits == commits
        assert wal.stat().st_size == size
        assert gw.ingress.tracker.last_seen("A-002") is not None  # the heartbeats were seen, in memory


async def test_a_plate_recognizer_frame_is_one_decision_for_its_best_result(tmp_path: Path) -> None:
    # The car in the lane and two plates parked behind it: one entry, for the best score, not three.
    cfg = site_config(tmp_path / "state", port=free_port(), embedded=True)
    results = [
        {"plate": "bg111aa", "score": 0.62},
        {"plate": "ab123cd", "score": 0.91},
        {"plate": "bg222bb"},
        {"plate": "bg333cc", "score": 0.91},
    ]
    frame = {"data": {"camera_id": "cam-in1", "timestamp": now_iso(), "filename": "f.jpg", "results": results}}
    async with running(cfg), observer(cfg.broker.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        await obs.pub("cameras/cam-in1/platerecognizer", frame)
        await obs.wait_for(lambda: obs.events("session.started"))
        await obs.pub(f"{R}/request/availability", {"transaction": "a1", "lot": "lot1"})  # after the frame's commit
        await obs.wait_for(lambda: any(t == f"{R}/response/availability" for t, _, _ in obs.messages))
        assert len(obs.events("session.started")) == 1
    sessions = reader(cfg).execute("SELECT plate FROM sessions").fetchall()
    assert [row["plate"] for row in sessions] == ["AB123CD"]


async def test_a_transaction_belongs_to_one_verb(tmp_path: Path) -> None:
    cfg = site_config(tmp_path / "state", port=free_port(), embedded=True)
    async with running(cfg), observer(cfg.broker.port) as obs:
        entered = await obs.request("enter", {"transaction": "t-1", "vehicle": "AB123CD", "lot": "lot1"})
        assert entered["status"] == "ok"
        for verb, body in (
            ("exit", {"vehicle": "AB123CD"}),
            ("block", {"slot": "A-002"}),
            ("availability", {"lot": "lot1"}),
            ("sessions", {}),
        ):
            reply = await obs.request(verb, {"transaction": "t-1", **body})
            assert reply["status"] == "error" and reply["error"]["code"] == "conflict", (verb, reply)
        again = await obs.request("enter", {"transaction": "t-1", "vehicle": "AB123CD", "lot": "lot1"})
        assert again == entered  # the enter itself still replays
    conn = reader(cfg)
    assert [r["state"] for r in conn.execute("SELECT state FROM sessions")] == ["active"]
    assert conn.execute("SELECT blocked FROM slots WHERE id = 'A-002'").fetchone()[0] == 0


async def test_mqtt5_response_topics_stay_under_the_allowed_filters(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    cfg = site_config(
        tmp_path / "state", port=mosquitto.port, embedded=False, broker_extra='response_topics = ["ops/+/replies"]'
    )
    asked = {
        "ops/desk/replies": "ops/desk/replies",
        f"{R}/response/mine": f"{R}/response/mine",
        f"{R}/status": f"{R}/response/availability",
        "sensors/A-001/state": f"{R}/response/availability",
        "ops/#": f"{R}/response/availability",
    }
    async with (
        running(cfg) as gw,
        observer(mosquitto.port) as obs,
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="v5-req", protocol=aiomqtt.ProtocolVersion.V5) as c,
    ):
        await c.subscribe([("ops/#", 1), ("sensors/#", 1), (f"{R}/response/#", 1), (f"{R}/status", 1)])
        for i, topic in enumerate(asked):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = topic
            props.CorrelationData = str(i).encode()
            body = json.dumps({"transaction": f"a{i}", "lot": "lot1"})
            await c.publish(f"{R}/request/availability", body, qos=1, properties=props)
        got: dict[str, str] = {}
        async with asyncio.timeout(10):
            async for m in c.messages:
                if m.topic.value == f"{R}/status":
                    assert m.payload == b"online"
                    continue
                assert m.properties is not None
                index = int(m.properties.CorrelationData)  # type: ignore[attr-defined]
                got[asked_topic := list(asked)[index]] = m.topic.value
                assert json.loads(m.payload)["status"] == "ok", asked_topic
                if len(got) == len(asked):
                    break
        assert got == asked
        assert gw.requests.rejected == {"response_topic": 3}
        assert obs.state(f"{R}/status") == "online"


async def test_a_request_whose_handler_fails_still_gets_a_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = site_config(tmp_path / "state", port=free_port(), embedded=True)
    async with running(cfg) as gw, observer(cfg.broker.port) as obs:

        async def broken(*_: object) -> None:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(gw.reads, "sessions", broken)
        reply = await obs.request("sessions", {"transaction": "s-1", "lot": "lot1"})
        assert reply == {
            "transaction": "s-1",
            "status": "error",
            "error": {"code": "unavailable", "message": "internal error; try again"},
        }
        assert gw.requests.failed == 1


async def test_a_store_locked_past_the_busy_timeout_loses_nothing(tmp_path: Path) -> None:
    import sqlite3

    # Another connection holds the write lock longer than SQLite's busy timeout (5 s): the group commit fails,
    # and is retried until the lock goes. The sensor transition, the camera's decision and the request all land.
    cfg = site_config(tmp_path / "state", port=free_port(), embedded=True)
    async with running(cfg) as gw, observer(cfg.broker.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        blocker = sqlite3.connect(gw.db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            await obs.pub("sensors/A-003/state", {"occupied": True, "seq": 1})
            await obs.pub("cameras/cam-in1/reads", {"event_id": "e1", "plate": "CAM 1", "ts": now_iso()})
            request = asyncio.create_task(obs.request("enter", {"vehicle": "REQ1", "lot": "lot1"}, timeout=20))
            await asyncio.sleep(5.5)
            assert not request.done()  # the first attempt failed at 5 s; it is retried, not answered
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert (await request)["status"] == "ok"
        await obs.wait_for(lambda: len(obs.events("session.started")) == 2 and obs.events("slot.status"))
    conn = reader(cfg)
    assert conn.execute("SELECT sensor_state FROM slots WHERE id = 'A-003'").fetchone()[0] == "occupied"
    plates = {row[0] for row in conn.execute("SELECT plate FROM sessions WHERE state = 'active'")}
    assert plates == {"CAM1", "REQ1"}
    assert audit(conn) == []
