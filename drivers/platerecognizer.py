"""Plate Recognizer Stream, its webhook JSON republished on `cameras/<camera_id>/platerecognizer`.

`{"hook": {...}, "data": {"camera_id", "filename", "timestamp", "results": [{"plate", "score",
"candidates": [{"plate", "score"}, ...]}, ...]}}` gives at most one `PlateRead`: a frame shows the car in the
lane and, often, plates parked in the background; one frame is one decision. Every result is validated (one
malformed result rejects the message), then the best is kept: the highest `score`; a result without a score
ranks below every scored one; on a tie the earlier result wins (Stream lists the most prominent first). A
frame without results yields None: nothing to decide, nothing wrong.
Stream sends no event id, so one is derived from what stays the same when a webhook is replayed: the camera
and the frame (`data.filename`, else `data.timestamp`) — not the plate text, not the result's place.
Stream ranks candidates best first and may send more than we keep: the first ten are kept, not rejected.
"""

from __future__ import annotations

import hashlib

from drivers.observations import (
    MAX_CANDIDATES,
    PlateRead,
    Rejected,
    as_confidence,
    as_object,
    as_str,
    check_id,
    field,
    load_object,
    normalise_plate,
    parse_timestamp,
    unique,
)


def parse_platerecognizer(camera_id: str, payload: bytes, *, now: float) -> PlateRead | None:
    """Validate one Stream webhook; `data.camera_id`, when present, must be the topic's camera."""
    check_id(camera_id, "camera id", "bad_device_id")
    obj = load_object(payload)
    data = as_object(field(obj, "data", required=True), "data")
    sent_camera = field(data, "camera_id", required=False)
    if sent_camera is not None and as_str(sent_camera, "data.camera_id") != camera_id:
        raise Rejected("device_mismatch", f"topic camera '{camera_id}' sent a read of another camera")
    raw_ts = as_str(field(data, "timestamp", required=True), "data.timestamp")
    ts = parse_timestamp(raw_ts, now=now)
    filename = field(data, "filename", required=False)
    frame = raw_ts if filename is None else as_str(filename, "data.filename")
    results = field(data, "results", required=True)
    if not isinstance(results, list):
        raise Rejected("wrong_type", "field 'data.results' must be an array")
    # The frame identifies the detection; the plate text does not: a webhook re-sent with a different reading
    # of the same car must be the same event.
    event_id = hashlib.sha256(f"{camera_id}|{frame}".encode("utf-8", "surrogatepass")).hexdigest()[:24]
    reads = [_read(camera_id, event_id, ts, as_object(r, "data.results[]")) for r in results]
    # max() keeps the first of equal keys: ties go to the earlier result.
    return max(reads, key=lambda r: -1.0 if r.confidence is None else r.confidence, default=None)


def _read(camera_id: str, event_id: str, ts: float, result: dict[str, object]) -> PlateRead:
    plate = normalise_plate(field(result, "plate", required=True), "results[].plate")
    score = field(result, "score", required=False)
    raw_candidates = field(result, "candidates", required=False)
    candidates: list[str] = []
    if raw_candidates is not None:
        if not isinstance(raw_candidates, list):
            raise Rejected("wrong_type", "field 'results[].candidates' must be an array")
        for candidate in raw_candidates[:MAX_CANDIDATES]:
            entry = as_object(candidate, "results[].candidates[]")
            candidates.append(normalise_plate(field(entry, "plate", required=True), "candidate"))
            entry_score = field(entry, "score", required=False)
            if entry_score is not None:
                as_confidence(entry_score, "results[].candidates[].score")
    return PlateRead(
        camera_id=camera_id,
        event_id=event_id,
        plate=plate,
        confidence=None if score is None else as_confidence(score, "results[].score"),
        ts=ts,
        candidates=unique(candidates),
    )
