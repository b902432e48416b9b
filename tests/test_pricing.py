"""Fees (contract §6): the rules one by one, DST, the occupancy factor, properties, and the tariff config."""

from __future__ import annotations

import ast
import math
import sys
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, parse_config
from gateway.config.tariffs import TariffConfig, TariffPeriod, parse_days
from gateway.core.pricing import band_factor, fee
from gateway.core.settings import Tariff
from gateway.store.settings import settings_from_config, tariff_from_config
from tests.test_config import MINIMAL

REPO = Path(__file__).resolve().parent.parent
BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3600.0


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0, tz: ZoneInfo = BERLIN) -> float:
    """Epoch seconds of a local wall time (the earlier one of an ambiguous time)."""
    return datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def tariff(periods: list[dict[str, Any]] | None = None, timezone: str = "Europe/Berlin", **fields: Any) -> Tariff:
    """A core tariff built the way the daemon builds it: from a validated config table."""
    data: dict[str, Any] = {"lot": "lot1", "currency": "EUR", "per_hour": 100, **fields}
    if periods is not None:
        data["periods"] = periods
    return tariff_from_config(TariffConfig.model_validate(data), timezone)


PEAK = {"days": "mon-fri", "from": "07:00", "to": "19:00", "per_hour": 300}


# ---- free minutes and started hours ----------------------------------------------------------------


def test_within_free_minutes_is_free_and_the_boundary_too() -> None:
    t = tariff(free_minutes=15, per_hour=250)
    assert fee(t, 1000.0, 1000.0, 1) == 0
    assert fee(t, 1000.0, 1000.0 + 900, 1) == 0
    assert fee(t, 1000.0, 1000.0 + 900.001, 1) == 250  # past them: the first hour, counted from the entry
    assert fee(t, 1000.0, 1000.0 + 3600, 1) == 250
    assert fee(t, 1000.0, 1000.0 + 3601, 1) == 500  # the free minutes do not shift the hours


def test_first_hour_is_owed_from_the_first_second() -> None:
    t = tariff(per_hour=250)
    assert fee(t, 0.0, 0.0, 1) == 0  # a session of no time at all has started no hour
    assert fee(t, 0.0, 0.001, 1) == 250
    assert fee(t, 0.0, 1.0, 1) == 250


@pytest.mark.parametrize(
    ("elapsed", "hours"), [(1, 1), (3599.9, 1), (3600, 1), (3600.5, 2), (7200, 2), (7201, 3), (23 * 3600 + 1, 24)]
)
def test_every_started_hour_counts(elapsed: float, hours: int) -> None:
    assert fee(tariff(per_hour=250), 5000.0, 5000.0 + elapsed, 1) == 250 * hours


def test_no_tariff_is_free() -> None:
    assert fee(None, 0.0, 86400.0, Fraction(5, 4)) == 0
    assert band_factor(None, 10, 10) == 1


def test_negative_elapsed_time_is_free() -> None:
    assert fee(tariff(), 1000.0, 900.0, 1) == 0


# ---- periods -----------------------------------------------------------------------------------------


def test_rate_is_that_of_the_period_the_hour_starts_in() -> None:
    t = tariff([PEAK])
    monday = (2026, 3, 2)
    assert fee(t, local(*monday, 6, 59), local(*monday, 6, 59) + 1, 1) == 100  # starts off-peak, runs into peak
    assert fee(t, local(*monday, 7, 0), local(*monday, 7, 0) + 1, 1) == 300  # `from` is inclusive
    assert fee(t, local(*monday, 6, 59), local(*monday, 7, 59) + 1, 1) == 100 + 300  # 2nd hour starts 07:59
    assert fee(t, local(*monday, 18, 59), local(*monday, 18, 59) + 1, 1) == 300
    assert fee(t, local(*monday, 19, 0), local(*monday, 19, 0) + 1, 1) == 100  # `to` is exclusive
    saturday = (2026, 3, 7)
    assert fee(t, local(*saturday, 10, 0), local(*saturday, 10, 0) + 1, 1) == 100


def test_period_over_midnight_belongs_to_the_day_it_starts() -> None:
    t = tariff([{"days": "fri", "from": "22:00", "to": "06:00", "per_hour": 50}])
    one_second = [
        ((2026, 3, 6, 22, 0), 50),  # Friday evening
        ((2026, 3, 7, 5, 30), 50),  # Saturday's early hours: Friday's period
        ((2026, 3, 7, 6, 0), 100),
        ((2026, 3, 6, 5, 30), 100),  # Friday's early hours belong to Thursday, which is not listed
        ((2026, 3, 7, 22, 0), 100),  # Saturday evening: Saturday is not listed
        ((2026, 3, 6, 21, 59), 100),
    ]
    for when, rate in one_second:
        assert fee(t, local(*when), local(*when) + 1, 1) == rate, when
    # Friday 21:30 to Saturday 06:30: hours start 21:30 (100), 22:30 ... 05:30 (8 x 50), 06:30 not started.
    assert fee(t, local(2026, 3, 6, 21, 30), local(2026, 3, 7, 6, 30), 1) == 100 + 8 * 50


def test_period_to_24_00_ends_at_midnight() -> None:
    t = tariff([{"days": "sat", "from": "18:00", "to": "24:00", "per_hour": 500}])
    assert fee(t, local(2026, 3, 7, 23, 59), local(2026, 3, 7, 23, 59) + 1, 1) == 500
    assert fee(t, local(2026, 3, 8, 0, 0), local(2026, 3, 8, 0, 0) + 1, 1) == 100
    whole_day = tariff([{"days": "sat", "from": "00:00", "to": "24:00", "per_hour": 500}])
    assert fee(whole_day, local(2026, 3, 7, 0, 0), local(2026, 3, 8, 0, 0), 1) == 24 * 500
    assert fee(whole_day, local(2026, 3, 7, 0, 0), local(2026, 3, 8, 0, 0) + 1, 1) == 24 * 500 + 100


def test_wrapping_day_range() -> None:
    assert parse_days("fri-mon") == {4, 5, 6, 0}
    assert parse_days("mon-fri") == {0, 1, 2, 3, 4}
    assert parse_days("sun-mon") == {6, 0}
    t = tariff([{"days": "fri-mon", "from": "00:00", "to": "24:00", "per_hour": 500}])
    rates = [fee(t, local(2026, 3, day, 12, 0), local(2026, 3, day, 12, 0) + 1, 1) for day in range(2, 9)]
    assert rates == [500, 100, 100, 100, 500, 500, 500]  # Monday 2 March .. Sunday 8 March 2026


def test_day_lists_combine() -> None:
    t = tariff([{"days": ["mon", "wed-thu"], "from": "10:00", "to": "11:00", "per_hour": 700}])
    rates = [fee(t, local(2026, 3, day, 10, 0), local(2026, 3, day, 10, 0) + 1, 1) for day in range(2, 9)]
    assert rates == [700, 100, 700, 700, 100, 100, 100]


def test_periods_follow_the_configured_timezone() -> None:
    utc, berlin = tariff([PEAK], timezone="UTC"), tariff([PEAK], timezone="Europe/Berlin")
    start = local(2026, 3, 2, 6, 30, tz=ZoneInfo("UTC"))  # 07:30 in Berlin (CET, +1)
    assert (fee(utc, start, start + 1, 1), fee(berlin, start, start + 1, 1)) == (100, 300)


# ---- the daily cap -----------------------------------------------------------------------------------


def test_daily_cap_per_started_24_hours_across_local_midnight() -> None:
    t = tariff(per_hour=250, daily_cap=2000)
    entry = local(2026, 3, 2, 22, 0)  # Monday 22:00 Berlin; a calendar day cap would split 2 + 8 hours
    assert fee(t, entry, entry + 7 * HOUR + 1, 1) == 2000  # 8 hours: 2000, exactly the cap
    assert fee(t, entry, entry + 10 * HOUR, 1) == 2000
    assert fee(t, entry, entry + 24 * HOUR, 1) == 2000
    assert fee(t, entry, entry + 24 * HOUR + 1, 1) == 2250  # a second 24 h block started
    assert fee(t, entry, entry + 48 * HOUR + 1, 1) == 4250
    assert fee(t, entry, entry + 72 * HOUR, 1) == 6000


def test_daily_cap_with_periods_in_the_configured_timezone() -> None:
    t = tariff([PEAK], daily_cap=2500)
    entry = local(2026, 3, 2, 18, 0)  # Monday 18:00: one peak hour, then off-peak through the night
    assert fee(t, entry, entry + 13 * HOUR, 1) == 300 + 12 * 100  # up to Tuesday 07:00: under the cap
    assert fee(t, entry, entry + 24 * HOUR, 1) == 2500  # 300 + 12 x 100 + 11 x 300 = 4800, capped
    assert fee(t, entry, entry + 24 * HOUR + 1, 1) == 2500 + 300  # block 2 starts Tuesday 18:00, peak


def test_daily_cap_of_zero_makes_it_free() -> None:
    assert fee(tariff(daily_cap=0), 0.0, 10 * 86400.0, 1) == 0


# ---- daylight saving time (Europe/Berlin: 29 March 2026 has 23 hours, 25 October 2026 has 25) ----------


def test_spring_forward_day_has_23_hours() -> None:
    t = tariff([{"days": "sun", "from": "00:00", "to": "24:00", "per_hour": 500}])
    sunday, monday = local(2026, 3, 29, 0, 0), local(2026, 3, 30, 0, 0)
    assert monday - sunday == 23 * HOUR
    assert fee(t, sunday, monday, 1) == 23 * 500
    assert fee(t, sunday, monday + 1, 1) == 23 * 500 + 100  # the 24th hour starts on Monday


def test_fall_back_day_has_25_hours() -> None:
    t = tariff([{"days": "sun", "from": "00:00", "to": "24:00", "per_hour": 500}])
    sunday, monday = local(2026, 10, 25, 0, 0), local(2026, 10, 26, 0, 0)
    assert monday - sunday == 25 * HOUR
    assert fee(t, sunday, monday, 1) == 25 * 500


def test_hours_are_real_hours_and_rated_by_the_wall_time_they_start_at() -> None:
    # Spring: entry 01:30 CET; the second hour starts 3600 s later, at 03:30 CEST (02:30 does not exist).
    t = tariff([{"days": "sun", "from": "03:00", "to": "04:00", "per_hour": 900}])
    entry = local(2026, 3, 29, 1, 30)
    assert fee(t, entry, entry + 2 * HOUR, 1) == 100 + 900
    # Autumn: entry 01:30 CEST; hours start 01:30, 02:30 CEST, 02:30 CET, 03:30: two of them at 02:30.
    t = tariff([{"days": "sun", "from": "02:00", "to": "03:00", "per_hour": 900}])
    entry = local(2026, 10, 25, 1, 30)
    assert fee(t, entry, entry + 4 * HOUR, 1) == 100 + 900 + 900 + 100


def test_daily_cap_blocks_are_24_real_hours_across_dst() -> None:
    t = tariff(per_hour=100, daily_cap=2300)
    entry = local(2026, 3, 28, 12, 0)  # Saturday noon; Sunday noon is 23 real hours later
    assert fee(t, entry, local(2026, 3, 29, 12, 0), 1) == 2300
    assert fee(t, entry, local(2026, 3, 29, 12, 0) + HOUR, 1) == 2300  # 24 h: still the first block
    assert fee(t, entry, local(2026, 3, 29, 12, 0) + HOUR + 1, 1) == 2400


# ---- the occupancy factor ----------------------------------------------------------------------------


def test_band_factor_is_exact_and_picks_the_highest_band_not_above() -> None:
    bands = [{"from": 0.5, "factor": 1.1}, {"from": 0.8, "factor": 1.25}]
    t = tariff(occupancy_multipliers=bands)
    assert band_factor(t, 4, 10) == 1  # below the first band
    assert band_factor(t, 5, 10) == Fraction(11, 10)
    assert band_factor(t, 79, 100) == Fraction(11, 10)
    assert band_factor(t, 8, 10) == Fraction(5, 4)  # 0.8 as written, not the float just above 4/5
    assert band_factor(t, 10, 10) == Fraction(5, 4)
    assert band_factor(t, 0, 0) == 1  # a lot without slots
    assert band_factor(tariff(), 10, 10) == 1


def test_factor_multiplies_the_capped_fee_rounded_half_up() -> None:
    t = tariff(per_hour=250, daily_cap=2000, occupancy_multipliers=[{"from": 0.8, "factor": 1.25}])
    factor = band_factor(t, 8, 10)
    assert fee(t, 0.0, 1.0, factor) == 313  # 312.5 rounds up
    assert fee(t, 0.0, 3 * HOUR, factor) == 938  # 937.5
    assert fee(t, 0.0, 24 * HOUR, factor) == 2500  # the cap first, then the factor
    assert fee(tariff(per_hour=10), 0.0, 1.0, Fraction("1.15")) == 12  # 11.5; in floats 1.15 * 10 = 11.4999...
    assert fee(tariff(per_hour=10), 0.0, 1.0, Fraction("1.14")) == 11
    assert fee(tariff(per_hour=1), 0.0, 1.0, Fraction(1, 2)) == 1
    assert fee(tariff(per_hour=1), 0.0, 1.0, Fraction(49, 100)) == 0


def test_factor_round_trips_as_text() -> None:
    factor = band_factor(tariff(occupancy_multipliers=[{"from": 0.0, "factor": 1.1}]), 0, 10)
    assert str(factor) == "11/10" and Fraction(str(factor)) == factor


# ---- properties ----------------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"]
DAY_SPECS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun", "mon-fri", "fri-mon", "sat-sun", "sun-tue"]


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@st.composite
def period_tables(draw: st.DrawFn) -> dict[str, Any]:
    # Whole hours often, so that hour starts land on period bounds (and entries on whole minutes, below).
    start = draw(st.integers(0, 23).map(lambda h: h * 60) | st.integers(0, 1439))
    end = draw((st.integers(1, 24).map(lambda h: h * 60) | st.integers(1, 1440)).filter(lambda e: e != start))
    days: str | list[str] = draw(st.sampled_from(DAY_SPECS) | st.lists(st.sampled_from(DAY_SPECS), min_size=1))
    return {"days": days, "from": _clock(start), "to": _clock(end), "per_hour": draw(st.integers(0, 1000))}


def _spans_overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(max(s1, s2) < min(e1, e2) for s1, e1 in a for s2, e2 in b)


@st.composite
def tariffs(draw: st.DrawFn, min_periods: int = 0) -> Tariff:
    # Candidate periods are kept only when they overlap none kept so far, as the config requires.
    kept: list[dict[str, Any]] = []
    spans: list[list[tuple[int, int]]] = []
    for table in draw(st.lists(period_tables(), min_size=min_periods, max_size=4)):
        these = TariffPeriod.model_validate(table).week_spans()
        if not any(_spans_overlap(these, other) for other in spans):
            kept.append(table)
            spans.append(these)
    return tariff(
        kept,
        timezone=draw(st.sampled_from(ZONES)),
        per_hour=draw(st.integers(0, 1000)),
        free_minutes=draw(st.integers(0, 120)),
        daily_cap=draw(st.none() | st.integers(0, 30000)),
    )


entries = st.floats(1.6e9, 1.9e9) | st.builds(  # 2020 .. 2030
    lambda hour, minute, second: hour * HOUR + minute * 60.0 + second,
    st.integers(444_445, 527_777),
    st.sampled_from([0, 30, 59]) | st.integers(0, 59),
    st.sampled_from([0, 0.5, 59.9]),
)
durations = st.floats(0, 40 * 86400.0) | st.builds(
    lambda hours, second: hours * HOUR + second, st.integers(0, 40 * 24), st.sampled_from([-1, 0, 0.001, 1])
)
factors = st.fractions(Fraction(1, 10), Fraction(5), max_denominator=100)


def reference_fee(t: Tariff, started_at: float, now: float, factor: Fraction) -> int:
    """The rules read literally: every started hour, one by one, by its local start."""
    elapsed = now - started_at
    if elapsed <= t.free_minutes * 60:
        return 0
    tz = ZoneInfo(t.timezone)
    blocks: list[int] = []
    k = 0
    while k * HOUR < elapsed:
        at = datetime.fromtimestamp(started_at + k * HOUR, tz)
        minute, yesterday = at.hour * 60 + at.minute, (at.weekday() - 1) % 7
        rate = t.per_hour
        for p in t.periods:
            same_day = at.weekday() in p.days and p.start <= minute < (p.end if p.start < p.end else 1440)
            overnight = p.end <= p.start and yesterday in p.days and minute < p.end
            if same_day or overnight:
                rate = p.per_hour
        if k % 24 == 0:
            blocks.append(0)
        blocks[-1] += rate
        k += 1
    total = sum(b if t.daily_cap is None else min(b, t.daily_cap) for b in blocks)
    exact = Decimal(total) * factor.numerator / factor.denominator
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@settings(max_examples=150, deadline=None)
@given(tariffs(min_periods=1) | tariffs(), entries, durations, factors)
def test_fee_matches_the_rules_read_hour_by_hour(t: Tariff, started_at: float, d: float, factor: Fraction) -> None:
    assert fee(t, started_at, started_at + d, factor) == reference_fee(t, started_at, started_at + d, factor)


@settings(max_examples=300, deadline=None)
@given(tariffs(), entries, durations, durations, factors)
def test_fee_is_a_bounded_monotone_integer(
    t: Tariff, started_at: float, d1: float, d2: float, factor: Fraction
) -> None:
    short, long = sorted((d1, d2))
    a, b = fee(t, started_at, started_at + short, factor), fee(t, started_at, started_at + long, factor)
    assert type(a) is int and type(b) is int
    assert 0 <= a <= b
    if long <= t.free_minutes * 60:
        assert b == 0
    if t.daily_cap is not None:
        started_blocks = math.ceil(long / 86400)
        cap = Fraction(started_blocks * t.daily_cap) * factor
        assert b <= math.floor(cap + Fraction(1, 2))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 1000), st.lists(st.fractions(0, 1, max_denominator=20), max_size=4))
def test_band_factor_is_that_of_the_highest_band_not_above(occupied: int, total: int, froms: list[Fraction]) -> None:
    occupied = min(occupied, total)
    bands = [{"from": float(f), "factor": float(i + 2)} for i, f in enumerate(sorted(set(froms)))]
    t = tariff(occupancy_multipliers=bands)
    share = Fraction(occupied, total)
    below = [Fraction(str(b["from"])) for b in bands if Fraction(str(b["from"])) <= share]
    assert band_factor(t, occupied, total) == (len(below) + 1 if below else 1)


# ---- the configuration ------------------------------------------------------------------------------------

TARIFF = '[[tariffs]]\nlot = "lot1"\ncurrency = "EUR"\nper_hour = 100\n'


def config_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.errors


def periods_errors(*periods: str) -> list[str]:
    return config_errors(MINIMAL + TARIFF + f"periods = [ {', '.join(periods)} ]\n")


def test_config_builds_periods_and_timezone() -> None:
    cfg = parse_config(
        MINIMAL.replace('id = "gw1"', 'id = "gw1"\ntimezone = "Europe/Berlin"')
        + TARIFF
        + 'periods = [ { days = "mon-fri", from = "07:00", to = "19:00", per_hour = 300 },'
        ' { days = ["sat", "sun"], from = "22:00", to = "06:00", per_hour = 50 } ]\n'
        + "occupancy_multipliers = [ { from = 0.8, factor = 1.25 } ]\n"
    )
    t = settings_from_config(cfg).tariffs["lot1"]
    assert t.timezone == "Europe/Berlin"
    assert [(sorted(p.days), p.start, p.end, p.per_hour) for p in t.periods] == [
        ([0, 1, 2, 3, 4], 420, 1140, 300),
        ([5, 6], 1320, 360, 50),
    ]
    assert [(b.from_, b.factor) for b in t.occupancy_multipliers] == [(Fraction(4, 5), Fraction(5, 4))]
    assert settings_from_config(parse_config(MINIMAL + TARIFF)).tariffs["lot1"].timezone == "UTC"


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        ("Europe/Berln", "gateway.timezone: unknown time zone 'Europe/Berln'"),
        ("europe/berlin", "gateway.timezone: unknown time zone 'europe/berlin'"),
        ("Europe", "gateway.timezone: unknown time zone 'Europe'"),
        ("/etc/localtime", "gateway.timezone: unknown time zone '/etc/localtime'"),
        ("../../etc/passwd", "gateway.timezone: unknown time zone '../../etc/passwd'"),
        ("", "gateway.timezone: unknown time zone ''"),
        ("localtime", "gateway.timezone: 'localtime' is not an IANA zone name"),
    ],
)
def test_unknown_timezone_names_the_field(zone: str, message: str) -> None:
    errors = config_errors(MINIMAL.replace('id = "gw1"', f'id = "gw1"\ntimezone = "{zone}"'))
    assert len(errors) == 1 and errors[0].startswith(message), errors


@pytest.mark.parametrize(
    ("periods", "expected"),
    [
        (
            [
                '{ days = "mon-fri", from = "07:00", to = "19:00", per_hour = 300 }',
                '{ days = "sun-xyz", from = "07:00", to = "19:00", per_hour = 1 }',
            ],
            ["tariffs[0].periods[1].days: unknown day 'sun-xyz'"],
        ),
        (
            ['{ days = ["mon", "Tue"], from = "07:00", to = "19:00", per_hour = 1 }'],
            ["tariffs[0].periods[0].days[1]: unknown day 'Tue'"],
        ),
        (['{ days = [], from = "07:00", to = "19:00", per_hour = 1 }'], ["tariffs[0].periods[0].days: empty list"]),
        (
            ['{ days = "mon-mon", from = "07:00", to = "19:00", per_hour = 1 }'],
            ["tariffs[0].periods[0].days: range 'mon-mon' starts and ends on the same day"],
        ),
        (
            ['{ days = 1, from = "07:00", to = "19:00", per_hour = 1 }'],
            ["tariffs[0].periods[0].days: expected a day or range"],
        ),
        (
            ['{ days = "mon", from = "7:00", to = "24:30", per_hour = -1 }'],
            [
                "tariffs[0].periods[0].from: expected a time",
                "tariffs[0].periods[0].to: expected a time",
                "tariffs[0].periods[0].per_hour: Input should be greater than or equal to 0",
            ],
        ),
        (
            ['{ days = "mon", from = "24:00", to = "06:00", per_hour = 1 }'],
            ['tariffs[0].periods[0].from: expected a time "00:00".."23:59", got \'24:00\''],
        ),
        (
            ['{ days = "mon", from = "08:00", to = "08:00", per_hour = 1 }'],
            ["tariffs[0].periods[0].to: equal to 'from'"],
        ),
        (
            ['{ days = "mon", from = "08:00", to = "09:00", per_hour = 1.5 }'],
            ["tariffs[0].periods[0].per_hour: Input should be a valid integer"],
        ),
        (
            ['{ days = "mon", from = "08:00", until = "09:00", per_hour = 1 }'],
            ["tariffs[0].periods[0].to: required key is missing", "tariffs[0].periods[0].until: unknown key"],
        ),
        (
            [
                '{ days = "mon-fri", from = "07:00", to = "19:00", per_hour = 300 }',
                '{ days = "fri-sat", from = "18:00", to = "08:00", per_hour = 50 }',
            ],
            ["tariffs[0].periods[1]: overlaps periods[0] from fri 18:00 to fri 19:00"],
        ),
        (
            [
                '{ days = "sun", from = "22:00", to = "06:00", per_hour = 50 }',
                '{ days = "mon", from = "00:00", to = "24:00", per_hour = 80 }',
                '{ days = "sat", from = "20:00", to = "24:00", per_hour = 80 }',
                '{ days = "sat", from = "23:00", to = "23:30", per_hour = 90 }',
            ],
            [
                "tariffs[0].periods[1]: overlaps periods[0] from mon 00:00 to mon 06:00",
                "tariffs[0].periods[3]: overlaps periods[2] from sat 23:00 to sat 23:30",
            ],
        ),
    ],
)
def test_bad_periods_are_named_by_path(periods: list[str], expected: list[str]) -> None:
    errors = periods_errors(*periods)
    assert len(errors) == len(expected), errors
    for line, start in zip(sorted(errors), sorted(expected), strict=True):
        assert line.startswith(start), errors


def test_adjacent_periods_do_not_overlap() -> None:
    cfg = parse_config(
        MINIMAL + TARIFF + 'periods = [ { days = "mon-sun", from = "07:00", to = "19:00", per_hour = 300 },'
        ' { days = "mon-sun", from = "19:00", to = "07:00", per_hour = 50 } ]\n'
    )
    assert len(cfg.tariffs[0].periods) == 2


def test_pricing_imports_only_the_standard_library_and_the_core() -> None:
    for name in ("pricing", "settings"):
        tree = ast.parse((REPO / "gateway" / "core" / f"{name}.py").read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        outside = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}
        assert {m for m in outside if not m.startswith("gateway.core")} == set()


def test_a_month_across_dst_equals_the_hour_by_hour_reading() -> None:
    t = tariff([PEAK, {"days": "sat-sun", "from": "22:00", "to": "02:00", "per_hour": 40}], daily_cap=5000)
    entry = local(2026, 3, 14, 12, 0)
    end = entry + 30 * 86400 + 1
    assert fee(t, entry, end, Fraction(5, 4)) == reference_fee(t, entry, end, Fraction(5, 4))
