"""Fees in integer minor units, from a lot's tariff."""

from __future__ import annotations

import math

from gateway.core.settings import Tariff


def fee(tariff: Tariff | None, duration_s: float) -> int:
    """Free minutes, then per started hour, capped per started day."""
    if tariff is None or duration_s <= tariff.free_minutes * 60:
        return 0
    days, rest = divmod(max(0.0, duration_s), 86400.0)
    hours_rest = math.ceil(rest / 3600.0)
    per_day = 24 * tariff.per_hour
    if tariff.daily_cap is not None:
        per_day = min(per_day, tariff.daily_cap)
    rest_fee = hours_rest * tariff.per_hour
    if tariff.daily_cap is not None:
        rest_fee = min(rest_fee, tariff.daily_cap)
    return int(days) * per_day + rest_fee
