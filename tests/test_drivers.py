"""Ingress drivers: bytes in, a typed observation or `Rejected` out — never any other exception."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.json_camera import parse_json_camera
from drivers.json_sensor import parse_json_sensor
from drivers.observations import MAX_PAYLOAD, PlateRead, Rejected, SensorObservation, parse_timestamp
from drivers.platerecognizer import parse_platerecognizer
from drivers.tts import parse_tts_uplink

NOW = datetime(2026, 11, 25, 10, 0, 5, tzinfo=UTC).timestamp()
TEN = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC).timestamp()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def rejected(call: Callable[[], object]) -> Rejected:
    with pytest.raises(Rejected) as info:
        call()
    return info.value


# --- timestamps -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-25T10:00:00Z", TEN),
        ("2026-11-25T10:00:00.250z", TEN + 0.25),
        ("2026-11-25T11:00:00+01:00", TEN),
        ("2026-11-25T09:30:00-00:30", TEN),
        ("2026-11-25 10:00:00Z", TEN),
        ("2026-11-25T10:00:00.123456789Z", TEN + 0.123456789),  # TTS sends nanoseconds
        (int(TEN * 1000) + 7, TEN + 0.007),
    ],
)
def test_timestamp_accepts_rfc3339_and_epoch_ms(value: object, expected: float) -> None:
    assert parse_timestamp(value, now=NOW) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2026-11-25T10:00:00", "bad_timestamp"),  # no zone: ambiguous
        ("2026-11-25", "bad_timestamp"),
        ("2026-02-30T10:00:00Z", "bad_timestamp"),
        ("2026-11-25T10:00:60Z", "bad_timestamp"),
        ("2026-11-25T10:00:00+25:00", "bad_timestamp"),
        ("\uff12\uff10\uff12\uff16-11-25T10:00:00Z", "bad_timestamp"),  # fullwidth digits
        ("yesterday", "bad_timestamp"),
        ("x" * 10_000, "bad_timestamp"),
        (True, "bad_timestamp"),
        (False, "bad_timestamp"),
        (TEN * 1000.0, "bad_timestamp"),  # epoch ms is an integer
        (str(int(TEN * 1000)), "bad_timestamp"),  # a number as a string
        (None, "bad_timestamp"),
        ([], "bad_timestamp"),
        ("1970-01-01T00:00:00Z", "ts_out_of_range"),
        ("2100-01-01T00:00:00Z", "ts_out_of_range"),
        (0, "ts_out_of_range"),
        (int(TEN) * 1000 * 1000, "ts_out_of_range"),  # microseconds by mistake
        (10**400, "ts_out_of_range"),
        (-(10**400), "ts_out_of_range"),
        ("0001-01-01T00:00:00+23:59", "ts_out_of_range"),
        ("9999-12-31T23:59:59-23:59", "ts_out_of_range"),
    ],
)
def test_timestamp_rejects(value: object, reason: str) -> None:
    assert rejected(lambda: parse_timestamp(value, now=NOW)).reason == reason


def test_timestamp_window_edges() -> None:
    assert parse_timestamp(int((NOW - 7 * 86400) * 1000), now=NOW) == NOW - 7 * 86400
    assert parse_timestamp(int((NOW + 300) * 1000), now=NOW) == NOW + 300
    assert rejected(lambda: parse_timestamp(int((NOW + 301) * 1000), now=NOW)).reason == "ts_out_of_range"
    assert rejected(lambda: parse_timestamp(int((NOW - 7 * 86400 - 1) * 1000), now=NOW)).reason == ("ts_out_of_range")


# --- JSON sensor ----------------------------------------------------------------------------------------


def test_json_sensor_full_payload() -> None:
    payload = dumps({"occupied": True, "ts": "2026-11-25T10:00:00Z", "seq": 17, "battery": 3.6, "rssi": -70})
    assert parse_json_sensor("L1-001", payload, now=NOW) == SensorObservation(
        sensor_id="L1-001", occupied=True, ts=TEN, seq=17, battery=3.6, source="json"
    )


def test_json_sensor_minimal_and_nulls() -> None:
    for payload in (b'{"occupied": false}', b'{"occupied": false, "ts": null, "seq": null, "battery": null}'):
        obs = parse_json_sensor("s1", payload, now=NOW)
        assert obs == SensorObservation("s1", False, None, None, None, "json")


def test_json_sensor_seq_bounds() -> None:
    assert parse_json_sensor("s", b'{"occupied": true, "seq": 0}', now=NOW).seq == 0
    assert parse_json_sensor("s", b'{"occupied": true, "seq": 4294967295}', now=NOW).seq == 2**32 - 1
    for bad in ("4294967296", "-1"):
        payload = f'{{"occupied": true, "seq": {bad}}}'.encode()
        with pytest.raises(Rejected, match="out_of_range"):
            parse_json_sensor("s", payload, now=NOW)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "invalid_json"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"occupied": tru', "invalid_json"),
        (b"[true]", "not_an_object"),
        (b"true", "not_an_object"),
        (b"null", "not_an_object"),
        (b"{}", "missing_field"),
        (b'{"occupied": null}', "missing_field"),
        (b'{"occupied": 1}', "wrong_type"),
        (b'{"occupied": "true"}', "wrong_type"),
        (b'{"occupied": true, "seq": true}', "wrong_type"),  # a bool is not a counter
        (b'{"occupied": true, "seq": 1.0}', "wrong_type"),
        (b'{"occupied": true, "seq": "17"}', "wrong_type"),
        (b'{"occupied": true, "battery": "3.6"}', "wrong_type"),
        (b'{"occupied": true, "battery": false}', "wrong_type"),
        (b'{"occupied": true, "battery": NaN}', "invalid_json"),
        (b'{"occupied": true, "battery": -Infinity}', "invalid_json"),
        (b'{"occupied": true, "battery": 1e999}', "invalid_json"),
        (b'{"occupied": true, "seq": 1' + b"0" * 5000 + b"}", "invalid_json"),  # past int's digit limit
        (b'{"occupied": true, "ts": "1970-01-01T00:00:00Z"}', "ts_out_of_range"),
        (b'{"occupied": true, "ts": "2100-01-01T00:00:00Z"}', "ts_out_of_range"),
        (b'{"occupied": true, "ts": 1.7e12}', "bad_timestamp"),
        (b"[" * 10_000, "invalid_json"),
        (b"[" * 10_000 + b"]" * 10_000, "invalid_json"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "invalid_json"),
    ],
)
def test_json_sensor_rejects(payload: bytes, reason: str) -> None:
    assert rejected(lambda: parse_json_sensor("s1", payload, now=NOW)).reason == reason


def test_oversized_payload_is_rejected_before_parsing() -> None:
    # Valid JSON, so only the size check can reject it.
    big = b'{"occupied": true, "pad": "' + b"x" * MAX_PAYLOAD + b'"}'
    assert rejected(lambda: parse_json_sensor("s1", big, now=NOW)).reason == "too_large"
    assert rejected(lambda: parse_json_sensor("s1", b"x" * 1024 * 1024, now=NOW)).reason == "too_large"
    edge = b'{"occupied": true}'.ljust(MAX_PAYLOAD, b" ")
    assert parse_json_sensor("s1", edge, now=NOW).occupied is True


@pytest.mark.parametrize("sensor_id", ["", "a b", "x" * 129, "tab\there", "nl\n"])
def test_bad_topic_ids_are_rejected(sensor_id: str) -> None:
    assert rejected(lambda: parse_json_sensor(sensor_id, b'{"occupied": true}', now=NOW)).reason == ("bad_device_id")


def test_rejected_carries_human_detail() -> None:
    error = rejected(lambda: parse_json_sensor("s1", b'{"occupied": 0}', now=NOW))
    assert error.detail == "field 'occupied' must be a boolean, got a number"


# --- The Things Stack -----------------------------------------------------------------------------------


def tts_uplink(device_id: str = "70b3d57ed0051234", **uplink: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "f_port": 1,
        "f_cnt": 42,
        "frm_payload": "AQ==",
        "decoded_payload": {"occupied": True, "battery": 3.1},
        "rx_metadata": [{"gateway_ids": {"gateway_id": "gw"}, "rssi": -80}],
        "received_at": "2026-11-25T09:59:59.9Z",
    }
    message.update(uplink)
    return {
        "end_device_ids": {
            "device_id": device_id,
            "application_ids": {"application_id": "parking"},
            "dev_eui": "70B3D57ED0051234",
        },
        "correlation_ids": ["as:up:01H"],
        "received_at": "2026-11-25T10:00:00.123456789Z",
        "uplink_message": message,
    }


def test_tts_uplink() -> None:
    obs = parse_tts_uplink("70b3d57ed0051234", dumps(tts_uplink()), now=NOW)
    assert obs.ts == pytest.approx(TEN + 0.123456789)
    assert obs == SensorObservation("70b3d57ed0051234", True, obs.ts, 42, 3.1, "tts")


def test_tts_missing_f_cnt_is_frame_zero() -> None:
    # The Things Stack leaves zero-valued fields out of its JSON: the first uplink after a join has no f_cnt.
    body = tts_uplink()
    del body["uplink_message"]["f_cnt"]
    assert parse_tts_uplink("70b3d57ed0051234", dumps(body), now=NOW).seq == 0


def test_tts_falls_back_to_uplink_received_at() -> None:
    body = tts_uplink()
    del body["received_at"]
    assert parse_tts_uplink("70b3d57ed0051234", dumps(body), now=NOW).ts == pytest.approx(TEN - 0.1)


def test_tts_device_mismatch() -> None:
    payload = dumps(tts_uplink("other-device"))
    assert rejected(lambda: parse_tts_uplink("70b3d57ed0051234", payload, now=NOW)).reason == "device_mismatch"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("end_device_ids"), "missing_field"),
        (lambda b: b.update(end_device_ids="x"), "wrong_type"),
        (lambda b: b["end_device_ids"].update(device_id=7), "wrong_type"),
        (lambda b: b.pop("uplink_message"), "missing_field"),
        (lambda b: b["uplink_message"].pop("decoded_payload"), "missing_field"),  # no payload formatter
        (lambda b: b["uplink_message"].update(decoded_payload=[1]), "wrong_type"),
        (lambda b: b["uplink_message"]["decoded_payload"].update(occupied=1), "wrong_type"),
        (lambda b: b["uplink_message"]["decoded_payload"].pop("occupied"), "missing_field"),
        (lambda b: b["uplink_message"].update(f_cnt=True), "wrong_type"),
        (lambda b: b["uplink_message"].update(f_cnt="42"), "wrong_type"),
        (lambda b: b["uplink_message"].update(f_cnt=2**32), "out_of_range"),
        (lambda b: b.update(received_at="2100-01-01T00:00:00Z"), "ts_out_of_range"),
        (lambda b: b.update(received_at=12), "ts_out_of_range"),
    ],
)
def test_tts_rejects(mutate: Callable[[dict[str, Any]], object], reason: str) -> None:
    body = tts_uplink()
    mutate(body)
    payload = dumps(body)
    assert rejected(lambda: parse_tts_uplink("70b3d57ed0051234", payload, now=NOW)).reason == reason


# --- JSON camera ----------------------------------------------------------------------------------------


def test_json_camera_full_read() -> None:
    payload = dumps(
        {
            "event_id": "e-1",
            "plate": "ab 123-cd",
            "confidence": 0.93,
            "ts": "2026-11-25T10:00:00Z",
            "candidates": ["AB123CD", "A8 123 CD", "ab123cd"],
        }
    )
    assert parse_json_camera("cam-in1", payload, now=NOW) == PlateRead(
        camera_id="cam-in1",
        event_id="e-1",
        plate="AB123CD",
        confidence=0.93,
        ts=TEN,
        candidates=("AB123CD", "A8123CD"),
    )


def test_json_camera_minimal() -> None:
    read = parse_json_camera("c", b'{"event_id": "x", "plate": "K"}', now=NOW)
    assert read == PlateRead("c", "x", "K", None, None, ())
    confident = parse_json_camera("c", b'{"event_id": "x", "plate": "K", "confidence": 1}', now=NOW)
    assert confident.confidence == 1.0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"plate": "AB123CD"}, "missing_field"),
        ({"event_id": "e"}, "missing_field"),
        ({"event_id": "", "plate": "AB123CD"}, "bad_event_id"),
        ({"event_id": "x" * 129, "plate": "AB123CD"}, "bad_event_id"),
        ({"event_id": "a\x00b", "plate": "AB123CD"}, "bad_event_id"),
        ({"event_id": 12, "plate": "AB123CD"}, "wrong_type"),
        ({"event_id": "e", "plate": 123}, "wrong_type"),
        ({"event_id": "e", "plate": " - "}, "bad_plate"),
        ({"event_id": "e", "plate": "A" * 17}, "bad_plate"),
        ({"event_id": "e", "plate": "AB.123"}, "bad_plate"),
        ({"event_id": "e", "plate": "AB123CD", "confidence": 1.5}, "out_of_range"),
        ({"event_id": "e", "plate": "AB123CD", "confidence": -0.1}, "out_of_range"),
        ({"event_id": "e", "plate": "AB123CD", "confidence": "0.9"}, "wrong_type"),
        ({"event_id": "e", "plate": "AB123CD", "candidates": "AB123CD"}, "wrong_type"),
        ({"event_id": "e", "plate": "AB123CD", "candidates": [1]}, "wrong_type"),
        ({"event_id": "e", "plate": "AB123CD", "candidates": ["AB!"]}, "bad_plate"),
        ({"event_id": "e", "plate": "AB123CD", "candidates": ["A"] * 11}, "too_many_candidates"),
    ],
)
def test_json_camera_rejects(body: dict[str, Any], reason: str) -> None:
    payload = dumps(body)
    assert rejected(lambda: parse_json_camera("cam", payload, now=NOW)).reason == reason


def test_json_camera_plate_boundaries() -> None:
    assert parse_json_camera("c", dumps({"event_id": "e", "plate": "A-" * 16}), now=NOW).plate == "A" * 16
    ten = [f"A{i}" for i in range(10)]
    read = parse_json_camera("c", dumps({"event_id": "e", "plate": "A0", "candidates": ten}), now=NOW)
    assert read.candidates == tuple(ten)


# --- Plate Recognizer Stream ----------------------------------------------------------------------------


def stream_webhook(camera_id: str = "cam-in1", **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "camera_id": camera_id,
        "filename": "cam-in1_screenshots/26-11-25/10-00-00.123456.jpg",
        "timestamp": "2026-11-25T10:00:00.123456Z",
        "timestamp_local": "2026-11-25 10:00:00.123456+00:00",
        "results": [
            {
                "box": {"xmin": 460, "ymin": 57, "xmax": 557, "ymax": 82},
                "plate": "ab123cd",
                "region": {"code": "it", "score": 0.9},
                "score": 0.902,
                "candidates": [{"plate": "ab123cd", "score": 0.902}, {"plate": "a8123cd"}],
                "dscore": 0.8,
                "vehicle": {"score": 0.7, "type": "Sedan"},
            }
        ],
    }
    body.update(data)
    return {
        "hook": {"target": "http://x", "id": camera_id, "event": "recognition", "filename": body["filename"]},
        "data": body,
    }


def test_platerecognizer_read() -> None:
    read = parse_platerecognizer("cam-in1", dumps(stream_webhook()), now=NOW)
    expected_id = hashlib.sha256(b"cam-in1|cam-in1_screenshots/26-11-25/10-00-00.123456.jpg").hexdigest()[:24]
    assert read is not None and read.ts == pytest.approx(TEN + 0.123456)
    assert read == PlateRead("cam-in1", expected_id, "AB123CD", 0.902, read.ts, ("AB123CD", "A8123CD"))


def test_platerecognizer_frame_yields_its_best_result() -> None:
    body = stream_webhook()
    results = body["data"]["results"]
    results.insert(0, {"plate": "zz999zz", "score": 0.5})  # parked in the background
    results.append({"plate": "nn111nn"})  # no score: below every scored result
    results.append({"plate": "tt222tt", "score": 0.902})  # a tie: the earlier result wins
    best = parse_platerecognizer("cam-in1", dumps(body), now=NOW)
    replay = parse_platerecognizer(
        "cam-in1", dumps({**body, "data": {**body["data"], "results": results[::-1]}}), now=NOW
    )
    assert best is not None and replay is not None
    assert best.plate == "AB123CD" and replay.plate == "TT222TT"
    assert best.event_id == replay.event_id  # one frame, one event, whichever result is best
    unscored = [{"plate": "nn111nn"}, {"plate": "mm333mm"}]
    only = parse_platerecognizer("cam-in1", dumps(stream_webhook(results=unscored)), now=NOW)
    assert only is not None and only.plate == "NN111NN" and only.confidence is None


def test_platerecognizer_without_filename_hashes_the_timestamp() -> None:
    body = stream_webhook()
    del body["data"]["filename"]
    del body["data"]["camera_id"]  # optional: the topic names the camera
    read = parse_platerecognizer("cam-in1", dumps(body), now=NOW)
    assert read is not None
    assert read.event_id == hashlib.sha256(b"cam-in1|2026-11-25T10:00:00.123456Z").hexdigest()[:24]


def test_platerecognizer_keeps_ten_best_candidates() -> None:
    body = stream_webhook()
    body["data"]["results"][0]["candidates"] = [{"plate": f"AB{i:03d}CD"} for i in range(15)]
    read = parse_platerecognizer("cam-in1", dumps(body), now=NOW)
    assert read is not None and read.candidates == tuple(f"AB{i:03d}CD" for i in range(10))


def test_platerecognizer_empty_results() -> None:
    assert parse_platerecognizer("cam-in1", dumps(stream_webhook(results=[])), now=NOW) is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b["data"].update(camera_id="cam-out1"), "device_mismatch"),
        (lambda b: b.pop("data"), "missing_field"),
        (lambda b: b["data"].pop("timestamp"), "missing_field"),
        (lambda b: b["data"].update(timestamp="2000-01-01T00:00:00Z"), "ts_out_of_range"),
        (lambda b: b["data"].update(results={}), "wrong_type"),
        (lambda b: b["data"].update(results=["AB123CD"]), "wrong_type"),
        (lambda b: b["data"]["results"][0].update(plate=None), "missing_field"),
        (lambda b: b["data"]["results"][0].update(score=2), "out_of_range"),
        (lambda b: b["data"]["results"][0].update(candidates=[{"score": 0.3}]), "missing_field"),
        (lambda b: b["data"]["results"][0].update(candidates=[{"plate": "X", "score": True}]), "wrong_type"),
        (lambda b: b["data"].update(filename=5), "wrong_type"),
    ],
)
def test_platerecognizer_rejects(mutate: Callable[[dict[str, Any]], object], reason: str) -> None:
    body = stream_webhook()
    mutate(body)
    payload = dumps(body)
    assert rejected(lambda: parse_platerecognizer("cam-in1", payload, now=NOW)).reason == reason


# --- totality: any input ends in a value or Rejected ----------------------------------------------------

PARSERS: list[Callable[[bytes], object]] = [
    lambda p: parse_json_sensor("s1", p, now=NOW),
    lambda p: parse_tts_uplink("70b3d57ed0051234", p, now=NOW),
    lambda p: parse_json_camera("cam-in1", p, now=NOW),
    lambda p: parse_platerecognizer("cam-in1", p, now=NOW),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["2026-11-25T10:00:00Z", "AB 123 CD", "70b3d57ed0051234", "cam-in1", "s1"]),
    st.just(int(TEN * 1000)),
)
keys = st.sampled_from(
    [
        "occupied",
        "ts",
        "seq",
        "battery",
        "event_id",
        "plate",
        "confidence",
        "candidates",
        "end_device_ids",
        "device_id",
        "uplink_message",
        "decoded_payload",
        "f_cnt",
        "received_at",
        "data",
        "camera_id",
        "timestamp",
        "filename",
        "results",
        "score",
        "hook",
    ]
) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(keys, children, max_size=6),
    max_leaves=30,
)


def check_total(payload: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(payload)
        except Rejected as error:
            assert error.reason and isinstance(error.detail, str)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_end_in_value_or_rejected(payload: bytes) -> None:
    check_total(payload)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_any_json_ends_in_value_or_rejected(value: object) -> None:
    check_total(json.dumps(value).encode())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=6), st.dictionaries(keys, json_values, max_size=6))
def test_near_valid_structures_end_in_value_or_rejected(inner: dict[str, object], outer: dict[str, object]) -> None:
    # Shapes close to the real formats reach the deeper validation paths.
    candidates = [
        {**outer, "data": {**inner, "results": [inner, {**inner, "candidates": [inner]}]}},
        {
            **outer,
            "end_device_ids": {**inner, "device_id": "70b3d57ed0051234"},
            "uplink_message": {**inner, "decoded_payload": inner},
        },
        {**outer, "occupied": True, **inner},
        {**outer, "event_id": "e", "plate": "AB1", **inner},
    ]
    for body in candidates:
        check_total(json.dumps(body).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc3\x28",  # invalid UTF-8
        b'{"occupied": true}\xff',
        b"\x00" * 100,
        b"x" * (1024 * 1024),
        b"[" * 10_000,
        b"{" * 10_000,
        b'{"data":' * 5000 + b"0" + b"}" * 5000,
        b"NaN",
        b'{"occupied": true, "ts": NaN, "seq": Infinity}',
        b'{"occupied": true, "ts": "1970-01-01T00:00:00Z"}',
        b'{"occupied": true, "ts": "2100-01-01T00:00:00Z"}',
        b'{"occupied": "true", "seq": "1", "battery": "3.6"}',
        b'{"occupied": null, "ts": null, "seq": null}',
        b'{"event_id": null, "plate": null, "data": null, "uplink_message": null}',
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
        '{"plate": "\ud800"}'.encode("utf-8", "surrogatepass"),
        b'{"event_id": "e", "plate": "\\ud800"}',  # an escaped lone surrogate
        b'{"data": {"timestamp": "2026-11-25T10:00:00Z", "filename": "\\udfff", "results": [{"plate": "A"}]}}',
    ],
)
def test_hand_picked_inputs_end_in_value_or_rejected(payload: bytes) -> None:
    check_total(payload)


def test_platerecognizer_resent_frame_keeps_its_event_id_whatever_the_reading() -> None:
    def hook(plate: str) -> bytes:
        doc = {"data": {"camera_id": "cam-in1", "timestamp": "2026-11-25T10:00:00Z", "filename": "f.jpg",
                        "results": [{"plate": plate, "score": 0.9}]}}  # fmt: skip
        return json.dumps(doc).encode()

    first = parse_platerecognizer("cam-in1", hook("ab123cd"), now=NOW)
    misread = parse_platerecognizer("cam-in1", hook("a8123cd"), now=NOW)
    assert first is not None and misread is not None
    assert first.plate != misread.plate and first.event_id == misread.event_id
