"""The core's `Settings`, built from the validated config (the core itself never imports pydantic)."""

from __future__ import annotations

from fractions import Fraction

from gateway.config import GatewayConfig, TariffConfig
from gateway.core.plates import PlateError, normalise
from gateway.core.reconcile import offline_pad, offline_slack
from gateway.core.settings import GateInfo, OccupancyBand, Settings, Tariff, TariffPeriod


def exact(value: float) -> Fraction:
    """A config number as the decimal the operator wrote: `str` gives the shortest repr, 1.1 -> 11/10."""
    return Fraction(str(value))


def tariff_from_config(t: TariffConfig, timezone: str) -> Tariff:
    """The core's tariff; `timezone` is `[gateway] timezone`, the zone its periods are written in."""
    return Tariff(
        currency=t.currency,
        per_hour=t.per_hour,
        free_minutes=t.free_minutes,
        daily_cap=t.daily_cap,
        exit_grace_minutes=t.exit_grace_minutes,
        occupancy_multipliers=tuple(OccupancyBand(exact(m.from_), exact(m.factor)) for m in t.occupancy_multipliers),
        periods=tuple(TariffPeriod(p.weekdays(), p.start_minute(), p.end_minute(), p.per_hour) for p in t.periods),
        timezone=timezone,
    )


def settings_from_config(cfg: GatewayConfig) -> Settings:
    zones: dict[str, set[str]] = {}
    types: dict[str, list[str]] = {}
    for s in cfg.slot_specs():
        zones.setdefault(s.lot, set()).add(s.zone)
        lot_types = types.setdefault(s.lot, [])
        if s.type not in lot_types:
            lot_types.append(s.type)
    return Settings(
        gateway_id=cfg.gateway.id,
        publish_plates=cfg.privacy.publish_plates,
        anti_passback=cfg.policy.anti_passback,
        deny=frozenset(_norm_or_raw(p) for p in cfg.access.deny),
        permits={_norm_or_raw(p.vehicle): tuple(p.types) for p in cfg.access.permits},
        restricted_types=frozenset(cfg.access.restricted_types),
        gates={g.id: GateInfo(g.id, g.lot, g.direction, g.serial is not None) for g in cfg.gates},
        tariffs={t.lot: tariff_from_config(t, cfg.gateway.timezone) for t in cfg.tariffs},
        lots=frozenset(lot.id for lot in cfg.lots),
        zones={k: frozenset(v) for k, v in zones.items()},
        types={k: tuple(v) for k, v in types.items()},
        reread_window=cfg.timing.reread_window,
        idempotency_ttl=cfg.timing.idempotency_ttl,
        retention_s=cfg.privacy.retention_days * 86400.0,
        rejections_kept=cfg.store.rejections_kept,
        has_upstream=cfg.upstream is not None,
        hold_ahead=cfg.timing.hold_ahead,
        no_show_after=cfg.timing.no_show_after,
        exit_unpaid=cfg.policy.exit_unpaid,
        arrival_window=cfg.timing.arrival_window,
        drive_time=cfg.timing.drive_time,
        vacate_grace=cfg.timing.vacate_grace,
        sensor_offline_after=cfg.timing.sensor_offline_after,
        offline_pad=offline_pad(cfg.timing.sensor_seen_flush),
        vacate_recheck=offline_slack(cfg.timing.sensor_seen_flush),
        reseat_settle=2 * cfg.timing.debounce,
        pass_timeout=cfg.timing.pass_timeout,
    )


def _norm_or_raw(plate: str) -> str:
    try:
        return normalise(plate)
    except PlateError:
        return plate
