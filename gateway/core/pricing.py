"""Fees in integer minor units from a lot's tariff (contract §6, "Fees and payment").

The API, all pure:

- `fee(tariff, started_at, now, factor) -> int`: the whole fee of a session that started at `started_at` and is
  looked at `now` (epoch seconds, the wall clock as recorded on the session); `tariff` None (a lot without a
  tariff) is free. `factor` is the session's occupancy factor from `band_factor`, taken at the entry.
- `band_factor(tariff, occupied, total) -> Fraction`: the factor of the band the lot is in, `occupied` and
  `total` as in the availability document just before the entry.
- What is due after payments is `max(0, fee(...) - paid)`. A factor is stored exactly as `str(factor)`
  (`"5/4"`, `"1"`) and read back with `Fraction(text)`; it is never a float.

The rules (contract §6; docs/design-notes.md "Fees" for where the contract is silent):

- Free while `now - started_at <= free_minutes * 60` (the boundary is still free).
- Past it: every hour started before `now`, hour k starting at `started_at + 3600 k` real seconds (the first at
  the entry; an hour starting exactly at `now` is not started). Each costs the `per_hour` of the period holding
  the local wall time of its start in the tariff's time zone (so DST days have 23 or 25 such hours), else the
  tariff's `per_hour`.
- Hours are grouped in blocks of 24 from the entry; each block costs at most `daily_cap`.
- The sum times the factor, rounded half up to an integer (exact rational arithmetic).

Cost: O(1) without periods; with periods O(started 24 h blocks), each block one local-time conversion and a
look-up in a cached per-week table of prefix sums (a block whose UTC offset changes is priced hour by hour).
"""

from __future__ import annotations

import functools
from datetime import datetime
from fractions import Fraction
from zoneinfo import ZoneInfo

from gateway.core.settings import Tariff, TariffPeriod

HOUR = 3600.0
BLOCK = 24 * HOUR
_DAY_MINUTES = 1440
_WEEK_MINUTES = 7 * _DAY_MINUTES
_WEEK_HOURS = 168


def fee(tariff: Tariff | None, started_at: float, now: float, factor: Fraction | int) -> int:
    """The session's whole fee at `now`, integer minor units (see the module docstring for the rules)."""
    if tariff is None:
        return 0
    elapsed = now - started_at
    if elapsed <= tariff.free_minutes * 60:
        return 0
    whole, part = divmod(elapsed, HOUR)
    hours = int(whole) + (part > 0)
    blocks, rest = divmod(hours, 24)
    cap = tariff.daily_cap
    if tariff.periods:
        total = _with_periods(tariff, started_at, blocks, rest)
    else:
        full, last = 24 * tariff.per_hour, rest * tariff.per_hour
        if cap is not None:
            full, last = min(full, cap), min(last, cap)
        total = blocks * full + last
    return _half_up(total, factor)


def band_factor(tariff: Tariff | None, occupied: int, total: int) -> Fraction:
    """The factor of the band with the highest `from` not above `occupied / total`; 1 below every band.

    A lot with no slots (`total` 0) has factor 1.
    """
    if tariff is None or total <= 0:
        return Fraction(1)
    share = Fraction(occupied, total)
    bands = [b for b in tariff.occupancy_multipliers if b.from_ <= share]
    return max(bands, key=lambda b: b.from_).factor if bands else Fraction(1)


def _half_up(amount: int, factor: Fraction | int) -> int:
    # floor(amount * factor + 1/2) for amount >= 0, in integers: never a float on the way.
    num, den = amount * factor.numerator, factor.denominator
    return (2 * num + den) // (2 * den)


def _with_periods(tariff: Tariff, started_at: float, blocks: int, rest: int) -> int:
    tz = ZoneInfo(tariff.timezone)
    cap = tariff.daily_cap
    count = blocks + (rest > 0)
    tables: dict[int, tuple[int, ...]] = {}
    total = 0
    first = datetime.fromtimestamp(started_at, tz)
    for j in range(count):
        start = started_at + j * BLOCK
        if j + 1 < count:  # bounded by the next block's start, which is then the next `first`
            n, bound = 24, datetime.fromtimestamp(start + BLOCK, tz)
        else:
            n = 24 if j < blocks else rest
            bound = first if n == 1 else datetime.fromtimestamp(start + (n - 1) * HOUR, tz)
        # Equal offsets at both ends mean none in between: no tz database zone changes its offset twice
        # within 48 hours (checked over every zone since 1970), so a 24-hour span holds at most one change.
        if first.utcoffset() == bound.utcoffset():
            minute = _minute_of_week(first)
            phase = minute % 60
            sums = tables.get(phase)
            if sums is None:
                sums = tables[phase] = _week_sums(tariff.periods, tariff.per_hour, phase)
            hour = minute // 60
            block = sums[hour + n] - sums[hour]
        else:
            block = sum(
                _rate(tariff.periods, tariff.per_hour, _minute_of_week(datetime.fromtimestamp(start + k * HOUR, tz)))
                for k in range(n)
            )
        total += block if cap is None else min(block, cap)
        first = bound
    return total


def _minute_of_week(local: datetime) -> int:
    return local.weekday() * _DAY_MINUTES + local.hour * 60 + local.minute


def _rate(periods: tuple[TariffPeriod, ...], per_hour: int, minute_of_week: int) -> int:
    """The rate of an hour starting at this local minute of the week (0 = Monday 00:00)."""
    day, minute = divmod(minute_of_week, _DAY_MINUTES)
    for p in periods:
        if p.start < p.end:
            inside = day in p.days and p.start <= minute < p.end
        else:  # over midnight: the evening of a listed day, or the early hours after one
            inside = (day in p.days and minute >= p.start) or ((day - 1) % 7 in p.days and minute < p.end)
        if inside:
            return p.per_hour
    return per_hour


@functools.lru_cache(maxsize=256)
def _week_sums(periods: tuple[TariffPeriod, ...], per_hour: int, phase: int) -> tuple[int, ...]:
    """Prefix sums of the rates of hours starting at minute `phase` of each hour of the week, plus a day.

    Period bounds are whole minutes, so an hour's rate depends only on the minute it starts in; with a fixed
    UTC offset consecutive hours start 60 local minutes apart, keeping their phase.
    """
    sums = [0]
    for h in range(_WEEK_HOURS + 24):
        sums.append(sums[-1] + _rate(periods, per_hour, (phase + 60 * h) % _WEEK_MINUTES))
    return tuple(sums)
