"""LoRaWAN sensors through The Things Stack v3: `v3/<app>@<tenant>/devices/<device_id>/up`.

The uplink JSON carries the device in `end_device_ids.device_id`, the state in
`uplink_message.decoded_payload.occupied` (the application's payload formatter must produce it), the
frame counter in `uplink_message.f_cnt` and the network's reception time in `received_at`.
The Things Stack omits zero-valued fields from its JSON, so an uplink without `f_cnt` is frame 0 (the
first uplink after a join), which the tracker sees as a counter reset.
"""

from __future__ import annotations

from drivers.observations import (
    Rejected,
    SensorObservation,
    as_bool,
    as_number,
    as_object,
    as_seq,
    as_str,
    check_id,
    field,
    load_object,
    parse_timestamp,
)


def parse_tts_uplink(topic_device_id: str, payload: bytes, *, now: float) -> SensorObservation:
    """Validate one TTS v3 uplink; the topic's device id must be the payload's."""
    check_id(topic_device_id, "device id", "bad_device_id")
    obj = load_object(payload)
    ids = as_object(field(obj, "end_device_ids", required=True), "end_device_ids")
    device_id = as_str(field(ids, "device_id", required=True), "end_device_ids.device_id")
    if device_id != topic_device_id:
        raise Rejected("device_mismatch", f"topic '{topic_device_id}', payload '{device_id[:64]}'")
    uplink = as_object(field(obj, "uplink_message", required=True), "uplink_message")
    decoded = as_object(field(uplink, "decoded_payload", required=True), "uplink_message.decoded_payload")
    occupied = as_bool(field(decoded, "occupied", required=True), "decoded_payload.occupied")
    f_cnt = field(uplink, "f_cnt", required=False)
    battery = field(decoded, "battery", required=False)
    received_at = field(obj, "received_at", required=False)
    if received_at is None:
        received_at = field(uplink, "received_at", required=False)
    return SensorObservation(
        sensor_id=device_id,
        occupied=occupied,
        ts=None if received_at is None else parse_timestamp(received_at, now=now),
        seq=0 if f_cnt is None else as_seq(f_cnt, "uplink_message.f_cnt"),
        battery=None if battery is None else as_number(battery, "decoded_payload.battery"),
        source="tts",
    )
