"""What one group commit sees: the connection, the clock, the settings, and the events it emits."""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.config import GatewayConfig, TariffConfig
from gateway.plates import PlateError, PlateKey, normalise


@dataclass(frozen=True, slots=True)
class GateInfo:
    id: str
    lot: str
    direction: str
    has_loops: bool  # a serial barrier controller reports loops; without one an entry is confirmed at once


@dataclass(frozen=True, slots=True)
class Settings:
    """The parts of the config the writer decides with, precomputed once."""

    gateway_id: str
    publish_plates: bool
    anti_passback: str
    deny: frozenset[str]
    permits: dict[str, tuple[str, ...]]
    restricted_types: frozenset[str]
    gates: dict[str, GateInfo]
    tariffs: dict[str, TariffConfig]
    lots: frozenset[str]
    zones: dict[str, frozenset[str]]
    types: dict[str, tuple[str, ...]]  # per lot, in order of first appearance
    reread_window: float
    idempotency_ttl: float
    retention_s: float
    rejections_kept: int
    has_upstream: bool

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> Settings:
        zones: dict[str, set[str]] = {}
        types: dict[str, list[str]] = {}
        for s in cfg.slot_specs():
            zones.setdefault(s.lot, set()).add(s.zone)
            lot_types = types.setdefault(s.lot, [])
            if s.type not in lot_types:
                lot_types.append(s.type)
        return cls(
            gateway_id=cfg.gateway.id,
            publish_plates=cfg.privacy.publish_plates,
            anti_passback=cfg.policy.anti_passback,
            deny=frozenset(_norm_or_raw(p) for p in cfg.access.deny),
            permits={_norm_or_raw(p.vehicle): tuple(p.types) for p in cfg.access.permits},
            restricted_types=frozenset(cfg.access.restricted_types),
            gates={g.id: GateInfo(g.id, g.lot, g.direction, g.serial is not None) for g in cfg.gates},
            tariffs={t.lot: t for t in cfg.tariffs},
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


def iso_ms(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Txn:
    """One open BEGIN IMMEDIATE transaction of the writer. Lives in the writer thread only."""

    conn: sqlite3.Connection
    settings: Settings
    key: PlateKey
    now: float
    next_seq: int
    events: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Append an event to the outbox; its seq is the next in this gateway's gapless sequence."""
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "seq": self.next_seq,
            "ts": iso_ms(self.now),
            "gateway": self.settings.gateway_id,
            "type": type_,
            **fields,
        }
        self.conn.execute(
            "INSERT INTO outbox (seq, event_id, type, created_at, body) VALUES (?, ?, ?, ?, ?)",
            (self.next_seq, event["event_id"], type_, self.now, json.dumps(event, separators=(",", ":"))),
        )
        self.next_seq += 1
        self.events.append(event)
        return event

    def alert(self, code: str, severity: str, subject: dict[str, Any], message: str) -> None:
        self.emit("alert", code=code, severity=severity, subject=subject, message=message)

    def vehicle_ref(self, plate: str, token: str) -> str:
        """What leaves the gateway for a vehicle: its token unless plates are configured to be published."""
        return plate if self.settings.publish_plates else token
