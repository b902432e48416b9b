"""`[[lots]]`, their zones and slot groups; slot id ranges."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Self

from pydantic import Field, PrivateAttr, field_validator, model_validator

from gateway.config.base import DEVICE_ID, ID_CHARS, Loc, Problems, StrictModel, TypeWord

MAX_SLOTS_PER_GROUP = 100_000

SLOT_ID = re.compile(rf"^{ID_CHARS}$")

# The numeric suffix of a range end; the lazy prefix leaves every trailing digit to the number.
_RANGE_END = re.compile(r"^(.*?)([0-9]+)$")


def _range_count(spec: str) -> tuple[str, int, int, int | None]:
    """(prefix, first, last, width or None when unpadded) of `"A-001..A-100"`; ValueError when it is wrong."""
    start, _, end = spec.partition("..")
    m_start, m_end = _RANGE_END.match(start), _RANGE_END.match(end)
    if m_start is None or m_end is None:
        raise ValueError(f"range ends must end in digits: {spec!r}")
    (prefix, first_digits), (end_prefix, last_digits) = m_start.groups(), m_end.groups()
    if prefix != end_prefix:
        raise ValueError(f"range ends have different prefixes {prefix!r} and {end_prefix!r}: {spec!r}")
    first, last = int(first_digits), int(last_digits)
    width: int | None
    if len(first_digits) == len(last_digits):
        width = len(first_digits)
    elif str(first) == first_digits and str(last) == last_digits:
        width = None
    else:
        raise ValueError(
            f"range ends have different digit widths ({len(first_digits)} and {len(last_digits)}); "
            f"a zero-padded range needs the same width on both ends: {spec!r}"
        )
    if last < first:
        raise ValueError(f"range end before start: {spec!r}")
    if last - first + 1 > MAX_SLOTS_PER_GROUP:
        raise ValueError(f"range of {last - first + 1} slots is too large (at most {MAX_SLOTS_PER_GROUP} per group)")
    return prefix, first, last, width


def _slot_id_problem(slot_id: str) -> str | None:
    if ".." in slot_id or not SLOT_ID.match(slot_id):
        return f"invalid slot id {slot_id!r}: 1 to 64 of A-Z a-z 0-9 _ . : - (no '..')"
    return None


def expand_slot_ids(ids: str | list[str]) -> list[str]:
    """The slot ids of a group: a range `"L1-001..L1-100"`, a single id, or a list of ids.

    A range's ends share a prefix and end in digits; with equal digit widths the zero padding is kept,
    otherwise both ends must be unpadded (`P1..P20`). Raises Problems (paths relative to `ids`).
    """
    if isinstance(ids, list):
        if not ids:
            raise Problems([((), "empty list of slot ids")])
        problems: list[tuple[Loc, str]] = [
            ((i,), p) for i, slot_id in enumerate(ids) if (p := _slot_id_problem(slot_id)) is not None
        ]
        if problems:
            raise Problems(problems)
        return list(ids)
    if ".." not in ids:
        problem = _slot_id_problem(ids)
        if problem is not None:
            raise Problems([((), problem)])
        return [ids]
    try:
        prefix, first, last, width = _range_count(ids)
    except ValueError as exc:
        raise Problems([((), str(exc))]) from None
    expanded = [f"{prefix}{n}" if width is None else f"{prefix}{n:0{width}d}" for n in range(first, last + 1)]
    problem = _slot_id_problem(expanded[-1]) or _slot_id_problem(expanded[0])
    if problem is not None:
        raise Problems([((), problem)])
    return expanded


class SlotGroup(StrictModel):
    """Slots of one type in a zone: a range, a single id, or a list of ids."""

    ids: str | list[str] = Field(
        description='`"L1-001..L1-100"` (inclusive range, zero padding kept), `"L1-113"`, or '
        '`["L1-111", "L1-112"]`. Slot ids: 1-64 of `A-Z a-z 0-9 _ . : -`; at most 100000 per group.'
    )
    type: TypeWord = Field("standard", description="Slot type, a free word: `standard`, `ev`, `accessible`, ...")
    sensor: str | None = Field(
        None,
        pattern=DEVICE_ID,
        description="Sensor id of the slot, only for a one-slot group; default: each slot's own id.",
    )
    offline_after: float | None = Field(
        None, gt=0, description="This group's `sensor_offline_after` (e.g. a LoRaWAN daily heartbeat)."
    )
    battery_low: float | None = Field(
        None, gt=0, description="This group's `[sensors] battery_low` (volts), for sensors of another chemistry."
    )

    _slot_ids: tuple[str, ...] = PrivateAttr(())

    @field_validator("ids", mode="before")
    @classmethod
    def _ids_shape(cls, value: object) -> object:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("expected a string (an id or a range) or a list of strings")

    @field_validator("ids")
    @classmethod
    def _ids_expand(cls, value: str | list[str]) -> str | list[str]:
        expand_slot_ids(value)
        return value

    @model_validator(mode="after")
    def _single_slot_sensor(self) -> Self:
        self._slot_ids = tuple(expand_slot_ids(self.ids))
        if self.sensor is not None and len(self._slot_ids) != 1:
            raise Problems([(("sensor",), f"only allowed for a single slot, this group has {len(self._slot_ids)}")])
        return self

    @property
    def slot_ids(self) -> tuple[str, ...]:
        """The expanded slot ids, in order."""
        return self._slot_ids


class ZoneConfig(StrictModel):
    """A group of slots: a level, an area."""

    id: str = Field(pattern=rf"^{ID_CHARS}$", description="Zone id, unique in its lot.")
    name: str | None = Field(None, description="Display name.")
    slots: list[SlotGroup] = Field(min_length=1, description="The zone's slots, in fill order.")


class LotConfig(StrictModel):
    """A facility served by this gateway."""

    id: str = Field(pattern=r"^[a-z0-9_-]{1,32}$", description="Lot id, `[a-z0-9_-]{1,32}`; appears in topics.")
    name: str = Field("", description="Display name.")
    zones: list[ZoneConfig] = Field(min_length=1, description="The lot's zones.")


@dataclass(frozen=True, slots=True)
class SlotSpec:
    """One configured slot, flattened."""

    id: str
    lot: str
    zone: str
    type: str
    sensor: str
    offline_after: float | None
    fill_order: int
    battery_low: float | None = None
