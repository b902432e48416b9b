"""Typed observations produced by the ingress drivers, and the strict helpers they share.

Every driver turns untrusted bytes into one of these values or raises `Rejected`; no other
exception may escape, whatever the input.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

MAX_PAYLOAD = 64 * 1024
MAX_PAST_S = 7 * 24 * 3600.0
MAX_FUTURE_S = 300.0
SEQ_MAX = 2**32 - 1
MAX_CANDIDATES = 10
MAX_PLATE_LEN = 16
MAX_ID_LEN = 128

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_PLATE_STRIP = str.maketrans("", "", " -")


class Rejected(Exception):
    """An input that failed validation; `reason` is a short stable code, `detail` human text."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SensorObservation:
    sensor_id: str
    occupied: bool
    ts: float | None
    seq: int | None
    battery: float | None
    source: Literal["json", "tts"]


@dataclass(frozen=True, slots=True)
class PlateRead:
    camera_id: str
    event_id: str
    plate: str
    confidence: float | None
    ts: float | None
    candidates: tuple[str, ...]


def _reject_constant(name: str) -> object:
    raise Rejected("invalid_json", f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("invalid_json", f"number {text[:32]} is out of range")
    return value


def load_object(payload: bytes) -> dict[str, object]:
    """Decode a JSON object payload: size first, then strict UTF-8, then finite numbers only."""
    if len(payload) > MAX_PAYLOAD:
        raise Rejected("too_large", f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", str(exc)) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except Rejected:
        raise
    except RecursionError:
        raise Rejected("invalid_json", "nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError, and int() past the digit limit
        raise Rejected("invalid_json", str(exc)[:200]) from None
    if not isinstance(value, dict):
        raise Rejected("not_an_object", f"top level is {_kind(value)}, expected an object")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def field(obj: dict[str, object], name: str, *, required: bool) -> object:
    """The value of `name`; JSON null counts as absent."""
    value = obj.get(name)
    if value is None and required:
        raise Rejected("missing_field", f"field '{name}' is required")
    return value


def as_object(value: object, name: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise Rejected("wrong_type", f"field '{name}' must be an object, got {_kind(value)}")
    return value


def as_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise Rejected("wrong_type", f"field '{name}' must be a boolean, got {_kind(value)}")
    return value


def as_seq(value: object, name: str) -> int:
    """A message counter: an integer (never a boolean) in 0..2**32-1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected("wrong_type", f"field '{name}' must be an integer, got {_kind(value)}")
    if not 0 <= value <= SEQ_MAX:
        raise Rejected("out_of_range", f"field '{name}' must be in 0..{SEQ_MAX}")
    return value


def as_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected("wrong_type", f"field '{name}' must be a number, got {_kind(value)}")
    try:
        result = float(value)
    except OverflowError:
        raise Rejected("out_of_range", f"field '{name}' is too large") from None
    if not math.isfinite(result):
        raise Rejected("out_of_range", f"field '{name}' must be finite")
    return result


def as_confidence(value: object, name: str) -> float:
    result = as_number(value, name)
    if not 0.0 <= result <= 1.0:
        raise Rejected("out_of_range", f"field '{name}' must be in 0..1")
    return result


def as_str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"field '{name}' must be a string, got {_kind(value)}")
    return value


def check_id(value: str, name: str, reason: str) -> str:
    """An identifier: 1..128 printable characters, no whitespace (it travels in topics and logs)."""
    if not 1 <= len(value) <= MAX_ID_LEN or not value.isprintable() or any(c.isspace() for c in value):
        raise Rejected(reason, f"{name} must be 1..{MAX_ID_LEN} printable characters without spaces")
    return value


def normalise_plate(value: object, name: str) -> str:
    """Upper-case, spaces and dashes removed; 1..16 letters or digits remain."""
    text = as_str(value, name)
    if len(text) > 4 * MAX_PLATE_LEN:
        raise Rejected("bad_plate", f"{name} is too long")
    plate = text.translate(_PLATE_STRIP).upper()
    if not 1 <= len(plate) <= MAX_PLATE_LEN:
        raise Rejected("bad_plate", f"{name} must have 1..{MAX_PLATE_LEN} characters besides spaces, dashes")
    if not plate.isalnum():
        raise Rejected("bad_plate", f"{name} may hold only letters, digits, spaces and dashes")
    return plate


def unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def parse_timestamp(value: object, *, now: float) -> float:
    """An RFC 3339 string or epoch milliseconds (int) as epoch seconds, within [now - 7 d, now + 5 min]."""
    if isinstance(value, str):
        seconds = _parse_rfc3339(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        # Compare in exact integer/float arithmetic first: huge ints must not reach float division.
        if not (now - MAX_PAST_S) * 1000 <= value <= (now + MAX_FUTURE_S) * 1000:
            raise Rejected("ts_out_of_range", "timestamp is more than 7 days old or 5 minutes ahead")
        seconds = value / 1000
    else:
        raise Rejected("bad_timestamp", f"timestamp must be RFC 3339 or epoch ms, got {_kind(value)}")
    if not now - MAX_PAST_S <= seconds <= now + MAX_FUTURE_S:
        raise Rejected("ts_out_of_range", "timestamp is more than 7 days old or 5 minutes ahead")
    return seconds


def _parse_rfc3339(text: str) -> float:
    match = _RFC3339.fullmatch(text) if len(text) <= 40 else None
    if match is None:
        raise Rejected("bad_timestamp", "timestamp is not RFC 3339 with a time zone")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = float(match.group(7)) if match.group(7) else 0.0
    if match.group(8):
        tz = UTC
    else:
        offset = timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
        if offset >= timedelta(hours=24):
            raise Rejected("bad_timestamp", "time zone offset out of range")
        tz = timezone(-offset if match.group(9) == "-" else offset)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=tz)
        return moment.timestamp() + fraction
    except (ValueError, OverflowError) as exc:  # Feb 30, hour 25, second 60 (no leap seconds), year 0
        raise Rejected("bad_timestamp", str(exc)) from None
