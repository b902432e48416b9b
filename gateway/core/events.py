"""Every event of contract §4 as a frozen dataclass, and the envelope each one travels in.

`Txn.emit` takes these; listeners after COMMIT receive `Envelope`s and match on the event's type. A field that
does not apply is None (null on the wire). The JSON Schema in docs/schemas/events.schema.json is generated
from these classes (`gateway.schemas`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Severity = Literal["info", "warning", "critical"]
SlotState = Literal["available", "occupied", "reserved", "blocked"]
SensorState = Literal["vacant", "occupied", "offline", "none"]
DenyReason = Literal["full", "denied", "already_active"]


@dataclass(frozen=True, slots=True)
class Fee:
    amount: int
    currency: str | None

    def to_json(self) -> dict[str, Any]:
        return {"amount": self.amount, "currency": self.currency}


class Event:
    """Base of the event types; `TYPE` is the contract's `type` string."""

    __slots__ = ()
    TYPE: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        """The event's own fields as JSON-ready values (the envelope adds the rest)."""
        out: dict[str, Any] = {}
        for name in _field_names(type(self)):
            value = getattr(self, name)
            out[name] = value.to_json() if isinstance(value, Fee) else value
        return out


_NAMES: dict[type[Event], tuple[str, ...]] = {}


def _field_names(cls: type[Event]) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return names


@dataclass(frozen=True, slots=True)
class SessionStarted(Event):
    """A vehicle got a session and a slot (committed before any barrier opens)."""

    TYPE = "session.started"
    session_id: str
    lot: str
    zone: str | None
    slot: str | None
    vehicle: str
    gate: str | None
    reservation_id: str | None


@dataclass(frozen=True, slots=True)
class SessionConfirmed(Event):
    """The vehicle passed the barrier (or entered where no barrier reports loops)."""

    TYPE = "session.confirmed"
    session_id: str
    gate: str | None


@dataclass(frozen=True, slots=True)
class SessionCancelled(Event):
    """The entry did not happen: no pass within pass_timeout, or the vehicle backed out; the slot is free."""

    TYPE = "session.cancelled"
    session_id: str
    slot: str | None
    reason: Literal["pass_timeout", "backed_out"]


@dataclass(frozen=True, slots=True)
class SessionMoved(Event):
    """The session was re-seated: the sensors found it in another slot, or it roams without one."""

    TYPE = "session.moved"
    session_id: str
    from_slot: str | None
    to_slot: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class SessionEnded(Event):
    """The vehicle left; `fee` is the session's whole fee."""

    TYPE = "session.ended"
    session_id: str
    lot: str
    slot: str | None
    vehicle: str
    gate: str | None
    duration_s: int
    fee: Fee


@dataclass(frozen=True, slots=True)
class SlotStatus(Event):
    """A slot's status or its sensor state changed."""

    TYPE = "slot.status"
    slot: str
    lot: str
    zone: str
    status: SlotState
    sensor: SensorState
    reason: str


@dataclass(frozen=True, slots=True)
class EntryDenied(Event):
    """An entry was refused."""

    TYPE = "entry.denied"
    lot: str
    gate: str | None
    vehicle: str
    reason: DenyReason


@dataclass(frozen=True, slots=True)
class ExitUnmatched(Event):
    """A plate at an exit matched no unique active session; the barrier stays closed."""

    TYPE = "exit.unmatched"
    gate: str | None
    vehicle: str


@dataclass(frozen=True, slots=True)
class _Reservation(Event):
    reservation_id: str
    lot: str
    slot: str | None
    vehicle: str
    start: str
    end: str


@dataclass(frozen=True, slots=True)
class ReservationCreated(_Reservation):
    """A reservation holds a slot for [start, end)."""

    TYPE = "reservation.created"


@dataclass(frozen=True, slots=True)
class ReservationMoved(_Reservation):
    """A walk-in was in the held slot: the reservation moved to another."""

    TYPE = "reservation.moved"


@dataclass(frozen=True, slots=True)
class ReservationCancelled(_Reservation):
    """The reservation was cancelled; its hold is freed."""

    TYPE = "reservation.cancelled"


@dataclass(frozen=True, slots=True)
class ReservationArrived(_Reservation):
    """The reserved vehicle arrived; a session.started with its reservation_id follows."""

    TYPE = "reservation.arrived"


@dataclass(frozen=True, slots=True)
class ReservationNoShow(_Reservation):
    """Nobody came by start + no_show_after; the hold is released."""

    TYPE = "reservation.no_show"


@dataclass(frozen=True, slots=True)
class PaymentRequested(Event):
    """Billed later: what is unpaid at exit (idempotency_key = the session id)."""

    TYPE = "payment.requested"
    session_id: str
    amount: int
    currency: str | None
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class PaymentConfirmed(Event):
    """A payment was recorded."""

    TYPE = "payment.confirmed"
    session_id: str
    amount: int
    currency: str | None
    idempotency_key: str
    payment_ref: str


@dataclass(frozen=True, slots=True)
class GateOpened(Event):
    """The gateway commanded a barrier to open."""

    TYPE = "gate.opened"
    gate: str
    reason: Literal["entry", "exit", "manual"]
    actor: str | None
    session_id: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class GateMode(Event):
    """A gate's mode was set."""

    TYPE = "gate.mode"
    gate: str
    mode: Literal["normal", "locked_open", "locked_closed"]
    actor: str | None


@dataclass(frozen=True, slots=True)
class Alert(Event):
    """Something an operator should know (`code`, e.g. slot.unregistered_occupancy, gate.offline)."""

    TYPE = "alert"
    code: str
    severity: Severity
    subject: dict[str, Any]
    message: str


EVENT_TYPES: tuple[type[Event], ...] = (
    SessionStarted,
    SessionConfirmed,
    SessionCancelled,
    SessionMoved,
    SessionEnded,
    SlotStatus,
    EntryDenied,
    ExitUnmatched,
    ReservationCreated,
    ReservationMoved,
    ReservationCancelled,
    ReservationArrived,
    ReservationNoShow,
    PaymentRequested,
    PaymentConfirmed,
    GateOpened,
    GateMode,
    Alert,
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One emitted event with its place in the gateway's sequence; `body` is the JSON that goes out."""

    event_id: str
    seq: int
    ts: str
    gateway: str
    event: Event
    body: str

    @property
    def type(self) -> str:
        return self.event.TYPE

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "seq": self.seq,
            "ts": self.ts,
            "gateway": self.gateway,
            "type": self.event.TYPE,
            **self.event.fields(),
        }
