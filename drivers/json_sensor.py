"""The plain JSON occupancy sensor: `sensors/<sensor_id>/state`.

Payload `{"occupied": true, "ts": "2026-11-25T10:00:00Z", "seq": 17, "battery": 3.6}`; only `occupied`
is required, null counts as absent, unknown keys are ignored (firmware adds diagnostics).
"""

from __future__ import annotations

from drivers.observations import (
    SensorObservation,
    as_bool,
    as_number,
    as_seq,
    check_id,
    field,
    load_object,
    parse_timestamp,
)


def parse_json_sensor(sensor_id: str, payload: bytes, *, now: float) -> SensorObservation:
    """Validate one JSON sensor message received on the topic of `sensor_id`."""
    check_id(sensor_id, "sensor id", "bad_device_id")
    obj = load_object(payload)
    occupied = as_bool(field(obj, "occupied", required=True), "occupied")
    ts = field(obj, "ts", required=False)
    seq = field(obj, "seq", required=False)
    battery = field(obj, "battery", required=False)
    return SensorObservation(
        sensor_id=sensor_id,
        occupied=occupied,
        ts=None if ts is None else parse_timestamp(ts, now=now),
        seq=None if seq is None else as_seq(seq, "seq"),
        battery=None if battery is None else as_number(battery, "battery"),
        source="json",
    )
