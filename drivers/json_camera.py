"""The plain JSON plate camera: `cameras/<camera_id>/reads`.

Payload `{"event_id": "...", "plate": "AB 123 CD", "confidence": 0.93, "ts": "...", "candidates": [...]}`;
`event_id` and `plate` are required. Plates come out normalised (upper case, no spaces or dashes).
"""

from __future__ import annotations

from drivers.observations import (
    MAX_CANDIDATES,
    PlateRead,
    Rejected,
    as_confidence,
    as_str,
    check_id,
    field,
    load_object,
    normalise_plate,
    parse_timestamp,
    unique,
)


def parse_json_camera(camera_id: str, payload: bytes, *, now: float) -> PlateRead:
    """Validate one plate read received on the topic of `camera_id`."""
    check_id(camera_id, "camera id", "bad_device_id")
    obj = load_object(payload)
    event_id = check_id(as_str(field(obj, "event_id", required=True), "event_id"), "event_id", "bad_event_id")
    plate = normalise_plate(field(obj, "plate", required=True), "plate")
    confidence = field(obj, "confidence", required=False)
    ts = field(obj, "ts", required=False)
    raw_candidates = field(obj, "candidates", required=False)
    candidates: list[str] = []
    if raw_candidates is not None:
        if not isinstance(raw_candidates, list):
            raise Rejected("wrong_type", "field 'candidates' must be an array of strings")
        if len(raw_candidates) > MAX_CANDIDATES:
            raise Rejected("too_many_candidates", f"at most {MAX_CANDIDATES} candidates")
        candidates = [normalise_plate(c, "candidate") for c in raw_candidates]
    return PlateRead(
        camera_id=camera_id,
        event_id=event_id,
        plate=plate,
        confidence=None if confidence is None else as_confidence(confidence, "confidence"),
        ts=None if ts is None else parse_timestamp(ts, now=now),
        candidates=unique(candidates),
    )
