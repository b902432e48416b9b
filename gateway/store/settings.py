"""The core's `Settings`, built from the validated config (the core itself never imports pydantic)."""

from __future__ import annotations

from gateway.config import GatewayConfig, TariffConfig
from gateway.core.plates import PlateError, normalise
from gateway.core.settings import GateInfo, OccupancyBand, Settings, Tariff


def tariff_from_config(t: TariffConfig) -> Tariff:
    return Tariff(
        currency=t.currency,
        per_hour=t.per_hour,
        free_minutes=t.free_minutes,
        daily_cap=t.daily_cap,
        exit_grace_minutes=t.exit_grace_minutes,
        occupancy_multipliers=tuple(OccupancyBand(m.from_, m.factor) for m in t.occupancy_multipliers),
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
        tariffs={t.lot: tariff_from_config(t) for t in cfg.tariffs},
        lots=frozenset(lot.id for lot in cfg.lots),
        zones={k: frozenset(v) for k, v in zones.items()},
        types={k: tuple(v) for k, v in types.items()},
        reread_window=cfg.timing.reread_window,
        idempotency_ttl=cfg.timing.idempotency_ttl,
        retention_s=cfg.privacy.retention_days * 86400.0,
        rejections_kept=cfg.store.rejections_kept,
        has_upstream=cfg.upstream is not None,
    )


def _norm_or_raw(plate: str) -> str:
    try:
        return normalise(plate)
    except PlateError:
        return plate
