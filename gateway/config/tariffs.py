"""`[[tariffs]]`: a lot's prices, with hourly rates by time of the week (`periods`)."""

from __future__ import annotations

import re
from typing import Self

from pydantic import Field, PrivateAttr, field_validator, model_validator

from gateway.config.base import Loc, Problems, StrictModel

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
DAY_MINUTES = 1440
WEEK_MINUTES = 7 * DAY_MINUTES

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


def _day(name: str) -> int:
    try:
        return DAY_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown day {name!r}") from None


def parse_days(spec: str) -> frozenset[int]:
    """`"sat"` or a range `"mon-fri"` (wrapping: `"fri-mon"`) as weekday numbers, 0 = Monday."""
    first, dash, last = spec.partition("-")
    try:
        if not dash:
            return frozenset({_day(spec)})
        start, end = _day(first), _day(last)
    except ValueError:
        raise ValueError(f"unknown day {spec!r}; days are {', '.join(DAY_NAMES)}, ranges like 'mon-fri'") from None
    if start == end:
        raise ValueError(f"range {spec!r} starts and ends on the same day; write {first!r} for one day")
    return frozenset((start + i) % 7 for i in range((end - start) % 7 + 1))


def parse_minutes(value: str, *, end: bool) -> int:
    """`"HH:MM"` as minutes after midnight; `"24:00"` (1440) only for the end of a period."""
    if end and value == "24:00":
        return DAY_MINUTES
    m = _HHMM.match(value)
    if m is None:
        allowed = '"00:00".."23:59" or "24:00"' if end else '"00:00".."23:59"'
        raise ValueError(f"expected a time {allowed}, got {value!r}")
    return int(m[1]) * 60 + int(m[2])


def _clock(minute_of_week: int, *, end: bool = False) -> str:
    day, minute = divmod(minute_of_week, DAY_MINUTES)
    if end and minute == 0:  # an end at midnight reads as the previous day's 24:00
        day, minute = day - 1, DAY_MINUTES
    return f"{DAY_NAMES[day % 7]} {minute // 60:02d}:{minute % 60:02d}"


class TariffPeriod(StrictModel):
    """A time of the week (local, `[gateway] timezone`) whose hours, by the time they start, have their own rate."""

    days: str | list[str] = Field(
        description='The days the period starts on: a day `"sat"`, a range `"mon-fri"` (inclusive; may wrap, '
        '`"fri-mon"` is fri, sat, sun, mon) or a list of those. Days: `mon tue wed thu fri sat sun`.'
    )
    from_: str = Field(
        alias="from", description='Local start time `"HH:MM"`, inclusive: an hour starting at `from` is in.'
    )
    to: str = Field(
        description='Local end time `"HH:MM"`, exclusive; `"24:00"` is the end of the day. Earlier than `from`: '
        "the period runs over midnight into the next day (a `fri` period 22:00-06:00 covers Saturday's early "
        "hours, not Friday's). Equal to `from` is an error (a whole day is 00:00-24:00)."
    )
    per_hour: int = Field(ge=0, description="Price of an hour that starts in this period, integer minor units.")

    _days: frozenset[int] = PrivateAttr(frozenset())
    _start: int = PrivateAttr(0)
    _end: int = PrivateAttr(0)

    @field_validator("days", mode="before")
    @classmethod
    def _days_shape(cls, value: object) -> object:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError('expected a day or range ("mon-fri") or a list of them')

    @field_validator("days")
    @classmethod
    def _days_valid(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            parse_days(value)
            return value
        if not value:
            raise ValueError("empty list of days")
        problems: list[tuple[Loc, str]] = []
        for i, spec in enumerate(value):
            try:
                parse_days(spec)
            except ValueError as exc:
                problems.append(((i,), str(exc)))
        if problems:
            raise Problems(problems)
        return value

    @field_validator("from_")
    @classmethod
    def _from_valid(cls, value: str) -> str:
        parse_minutes(value, end=False)
        return value

    @field_validator("to")
    @classmethod
    def _to_valid(cls, value: str) -> str:
        parse_minutes(value, end=True)
        return value

    @model_validator(mode="after")
    def _parsed(self) -> Self:
        specs = [self.days] if isinstance(self.days, str) else self.days
        self._days = frozenset(day for spec in specs for day in parse_days(spec))
        self._start = parse_minutes(self.from_, end=False)
        self._end = parse_minutes(self.to, end=True)
        if self._start == self._end:
            raise Problems([(("to",), "equal to 'from': the period would be empty; a whole day is 00:00-24:00")])
        return self

    def weekdays(self) -> frozenset[int]:
        """The days it starts on, 0 = Monday."""
        return self._days

    def start_minute(self) -> int:
        """`from` in minutes after midnight."""
        return self._start

    def end_minute(self) -> int:
        """`to` in minutes after midnight (1440 for `"24:00"`); not above `start_minute()`: over midnight."""
        return self._end

    def week_spans(self) -> list[tuple[int, int]]:
        """[start, end) in minutes of the week from Monday 00:00, split where they pass Sunday 24:00."""
        length = (self._end - self._start) % DAY_MINUTES or DAY_MINUTES
        spans: list[tuple[int, int]] = []
        for day in sorted(self._days):
            start = day * DAY_MINUTES + self._start
            end = start + length
            if end <= WEEK_MINUTES:
                spans.append((start, end))
            else:
                spans.extend([(start, WEEK_MINUTES), (0, end - WEEK_MINUTES)])
        return spans


class OccupancyMultiplier(StrictModel):
    """From an occupancy fraction on, the fee is multiplied by a factor."""

    from_: float = Field(
        alias="from",
        ge=0,
        le=1,
        description="Occupancy fraction 0..1 (`occupied / total` of the lot just before the entry) from which it "
        "applies; compared exactly as the decimal written, so 8 of 10 slots is in a band `from = 0.8`.",
    )
    factor: float = Field(
        gt=0,
        description="Multiplier of the session's whole fee (after the daily cap), taken at the entry; used as the "
        "exact decimal written (1.1 is 11/10); the product is rounded half up to minor units.",
    )


class TariffConfig(StrictModel):
    """A lot's tariff (see "Tariffs and fees" above); money is integer minor units, never floats. No tariff: free."""

    lot: str = Field(description="The lot this tariff applies to; one tariff per lot.")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. `EUR`.")
    free_minutes: int = Field(
        0,
        ge=0,
        description="A session that lasts at most this long is free; one that lasts longer pays every started "
        "hour from the entry, the free minutes included.",
    )
    per_hour: int = Field(ge=0, description="Price of a started hour outside every period, minor units.")
    daily_cap: int | None = Field(
        None,
        ge=0,
        description="Most charged for each started 24 hours counted from the entry (not per calendar day), minor "
        "units; unset: no cap.",
    )
    exit_grace_minutes: int = Field(
        10,
        ge=0,
        description="Time to leave after payment: `pay` answers `paid_until` = now + this, and an exit until then has"
        " nothing more due, even if an hour started meanwhile.",
    )
    occupancy_multipliers: list[OccupancyMultiplier] = Field(
        [],
        description="Surge pricing, by strictly increasing `from`; the band with the highest `from` not above the "
        "lot's occupancy applies; below the first one the factor is 1.",
    )
    periods: list[TariffPeriod] = Field(
        [],
        description="Hourly rates by local time of the week (`[gateway] timezone`), e.g. "
        '`{ days = "mon-fri", from = "07:00", to = "19:00", per_hour = 300 }`; must not overlap; hours '
        "starting outside every period cost `per_hour`.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        for i in range(1, len(self.occupancy_multipliers)):
            if self.occupancy_multipliers[i].from_ <= self.occupancy_multipliers[i - 1].from_:
                problems.append((("occupancy_multipliers", i, "from"), "must be greater than the previous 'from'"))
        # Overlaps are refused rather than resolved by order: with "first wins" a later, more specific period
        # (a Saturday special inside "mon-sun") would silently never apply, and the sign at the lane would lie.
        spans = [p.week_spans() for p in self.periods]
        for j in range(len(spans)):
            for i in range(j):
                overlap = _first_overlap(spans[i], spans[j])
                if overlap is not None:
                    problems.append(
                        (
                            ("periods", j),
                            f"overlaps periods[{i}] from {_clock(overlap[0])} to {_clock(overlap[1], end=True)}",
                        )
                    )
        if problems:
            raise Problems(problems)
        return self


def _first_overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> tuple[int, int] | None:
    shared = [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b if max(s1, s2) < min(e1, e2)]
    return min(shared) if shared else None
