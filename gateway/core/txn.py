"""What one group commit sees: the connection, the clock, the settings, and the events it emits."""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.core.clock import iso_ms
from gateway.core.domain import GateAction
from gateway.core.events import Alert, Envelope, Event, Severity
from gateway.core.plates import PlateKey
from gateway.core.settings import Settings


@dataclass
class Txn:
    """One open BEGIN IMMEDIATE transaction of the writer. Lives in the writer thread only."""

    conn: sqlite3.Connection
    settings: Settings
    key: PlateKey
    now: float  # wall time: what is recorded
    next_seq: int
    timer_now: float = 0.0  # the writer's Timeline: what timer deadlines are measured against
    events: list[Envelope] = field(default_factory=list)
    deadlines_changed: bool = False
    # What the barriers are to do once this commits (gateway/core/lanes.py); rolled back with the savepoint.
    actions: list[GateAction] = field(default_factory=list)

    def emit(self, event: Event) -> Envelope:
        """Append an event to the outbox; its seq is the next in this gateway's gapless sequence."""
        event_id = str(uuid.uuid4())
        ts = iso_ms(self.now)
        body = json.dumps(
            {
                "event_id": event_id,
                "seq": self.next_seq,
                "ts": ts,
                "gateway": self.settings.gateway_id,
                "type": event.TYPE,
                **event.fields(),
            },
            separators=(",", ":"),
        )
        self.conn.execute(
            "INSERT INTO outbox (seq, event_id, type, created_at, body) VALUES (?, ?, ?, ?, ?)",
            (self.next_seq, event_id, event.TYPE, self.now, body),
        )
        envelope = Envelope(event_id, self.next_seq, ts, self.settings.gateway_id, event, body)
        self.next_seq += 1
        self.events.append(envelope)
        return envelope

    def alert(self, code: str, severity: Severity, subject: dict[str, Any], message: str) -> None:
        self.emit(Alert(code=code, severity=severity, subject=subject, message=message))

    def vehicle_ref(self, plate: str, token: str) -> str:
        """What leaves the gateway for a vehicle: its token unless plates are configured to be published."""
        return plate if self.settings.publish_plates else token
