"""What the writer decides with: the parts of the config the core needs, as plain frozen values.

Built from the config by `gateway.store.settings.settings_from_config`; the core never sees pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GateInfo:
    id: str
    lot: str
    direction: str
    has_loops: bool  # a serial barrier controller reports loops; without one an entry is confirmed at once


@dataclass(frozen=True, slots=True)
class OccupancyBand:
    from_: float
    factor: float


@dataclass(frozen=True, slots=True)
class Tariff:
    """A lot's prices in integer minor units."""

    currency: str
    per_hour: int
    free_minutes: int = 0
    daily_cap: int | None = None
    exit_grace_minutes: int = 10
    occupancy_multipliers: tuple[OccupancyBand, ...] = ()


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
