"""fee() cost on the exit's hot path, next to the rules computed hour by hour in the same run.

.venv/bin/python -m bench.pricing            # about 10 s
.venv/bin/python -m bench.pricing --quick    # smoke check, about 1 s
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import timeit
from collections.abc import Callable
from datetime import datetime
from fractions import Fraction
from zoneinfo import ZoneInfo

from gateway.config.tariffs import TariffConfig
from gateway.core.pricing import fee
from gateway.core.settings import Tariff
from gateway.store.settings import tariff_from_config

ZONE = "Europe/Berlin"
HOUR = 3600.0
FACTOR = Fraction(5, 4)


def _tariff(periods: list[dict[str, object]]) -> Tariff:
    cfg = TariffConfig.model_validate(
        {"lot": "lot1", "currency": "EUR", "per_hour": 250, "daily_cap": 2000, "periods": periods}
    )
    return tariff_from_config(cfg, ZONE)


TARIFFS = {
    "flat": _tariff([]),
    "periods": _tariff(
        [
            {"days": "mon-fri", "from": "07:00", "to": "19:00", "per_hour": 300},
            {"days": "fri-sat", "from": "22:00", "to": "06:00", "per_hour": 150},
        ]
    ),
}


def hour_by_hour(t: Tariff, started_at: float, now: float, factor: Fraction) -> int:
    """The baseline: the contract's rules read literally, one local-time conversion per started hour."""
    elapsed = now - started_at
    if elapsed <= t.free_minutes * 60:
        return 0
    tz = ZoneInfo(t.timezone)
    blocks: list[int] = []
    k = 0
    while k * HOUR < elapsed:
        at = datetime.fromtimestamp(started_at + k * HOUR, tz)
        minute, day = at.hour * 60 + at.minute, at.weekday()
        rate = t.per_hour
        for p in t.periods:
            if p.start < p.end:
                inside = day in p.days and p.start <= minute < p.end
            else:
                inside = (day in p.days and minute >= p.start) or ((day - 1) % 7 in p.days and minute < p.end)
            if inside:
                rate = p.per_hour
        if k % 24 == 0:
            blocks.append(0)
        blocks[-1] += rate
        k += 1
    total = sum(b if t.daily_cap is None else min(b, t.daily_cap) for b in blocks)
    n, d = total * factor.numerator, factor.denominator
    return (2 * n + d) // (2 * d)


def _per_call_us(call: Callable[[], int], budget_s: float, repeat: int) -> float:
    number = max(1, int(budget_s / max(timeit.timeit(call, number=1), 1e-7)))
    return statistics.median(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check: shorter measurements")
    args = parser.parse_args()
    budget, repeat = (0.01, 3) if args.quick else (0.1, 5)
    tz = ZoneInfo(ZONE)
    monday = datetime(2026, 3, 2, 8, 30, tzinfo=tz).timestamp()
    before_dst = datetime(2026, 3, 14, 8, 30, tzinfo=tz).timestamp()  # 30 days across 29 March
    cases = [
        ("1 h", monday, HOUR),
        ("1 day", monday, 86400.0),
        ("7 days", monday, 7 * 86400.0),
        ("30 days", monday, 30 * 86400.0),
        ("30 days across DST", before_dst, 30 * 86400.0),
    ]
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| tariff | session | fee() us | hour by hour us | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, tariff in TARIFFS.items():
        for label, start, length in cases:
            now = start + length - 1
            got, want = fee(tariff, start, now, FACTOR), hour_by_hour(tariff, start, now, FACTOR)
            if got != want:
                raise SystemExit(f"{name} {label}: fee() {got} != hour by hour {want}")
            fast = _per_call_us(functools.partial(fee, tariff, start, now, FACTOR), budget, repeat)
            slow = _per_call_us(functools.partial(hour_by_hour, tariff, start, now, FACTOR), budget, repeat)
            print(f"| {name} | {label} | {fast:.1f} | {slow:.1f} | {slow / fast:.0f}x |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
