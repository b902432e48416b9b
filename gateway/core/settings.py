"""What the writer decides with: the parts of the config the core needs, as plain frozen values.

Built from the config by `gateway.store.settings.settings_from_config`; the core never sees pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class GateInfo:
    id: str
    lot: str
    direction: str
    has_loops: bool  # a serial barrier controller reports loops; without one an entry is confirmed at once


@dataclass(frozen=True, slots=True)
class OccupancyBand:
    """From occupancy fraction `from_` on, the fee is multiplied by `factor`; both exact."""

    from_: Fraction
    factor: Fraction


@dataclass(frozen=True, slots=True)
class TariffPeriod:
    """An hourly rate for hours starting at local times `start` <= t < `end` on `days`."""

    days: frozenset[int]  # the days it starts on, 0 = Monday (date.weekday())
    start: int  # minutes after local midnight, 0..1439
    end: int  # minutes after local midnight, 1..1440; not above `start`: runs over midnight into the next day
    per_hour: int


@dataclass(frozen=True, slots=True)
class Tariff:
    """A lot's prices in integer minor units; `periods` are in local time of `timezone` (IANA) and disjoint."""

    currency: str
    per_hour: int
    free_minutes: int = 0
    daily_cap: int | None = None
    exit_grace_minutes: int = 10
    occupancy_multipliers: tuple[OccupancyBand, ...] = ()
    periods: tuple[TariffPeriod, ...] = ()
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class Settings:
    gateway_id: str
    publish_plates: bool
    anti_passback: str
    deny: frozenset[str]
    permits: dict[str, tuple[str, ...]]
    restricted_types: frozenset[str]
    gates: dict[str, GateInfo]
    tariffs: dict[str, Tariff]
    lots: frozenset[str]
    zones: dict[str, frozenset[str]]
    types: dict[str, tuple[str, ...]]  # per lot, in order of first appearance
    reread_window: float
    idempotency_ttl: float
    retention_s: float
    rejections_kept: int
    has_upstream: bool
    # Reservations and payment (contract §6), gateway/core/reservations.py and exits.py
    hold_ahead: float = 1800.0
    no_show_after: float = 1800.0
    exit_unpaid: str = "deny"  # "deny" | "bill_later"
    # Sensors and sessions (contract §6), gateway/core/reconcile.py
    arrival_window: float = 900.0
    drive_time: float = 180.0
    vacate_grace: float = 600.0
    sensor_offline_after: float = 900.0
    # How far a stored offline deadline lies past the one kept in memory (gateway/core/reconcile.py).
    offline_pad: float = 300.0
    # A vacate countdown whose sensor has not been heard since the vacancy began looks again this much later.
    vacate_recheck: float = 120.0
    # An occupancy that re-seated a session and ended within this long of its first sighting was no parked car:
    # the re-seat is taken back (2 x debounce: it held past the debounce by less than a debounce).
    reseat_settle: float = 10.0
    # Barrier lanes (contract §6), gateway/core/lanes.py
    pass_timeout: float = 60.0
