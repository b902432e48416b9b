"""Commands the writer applies, the replies it gives and the contract's error codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ErrorCode = Literal[
    "invalid_request",
    "unknown_lot",
    "unknown_slot",
    "unknown_session",
    "full",
    "already_active",
    "conflict",
    "payment_required",
    "denied",
    "unavailable",
]


class CommandError(Exception):
    """A refusal with a contract error code; the writer rolls back the command's savepoint."""

    def __init__(
        self, code: ErrorCode, message: str, *, keep_effects: bool = False, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        # A refusal that still records something (entry.denied, exit.unmatched) keeps its events.
        self.keep_effects = keep_effects
        # Fields of the error object beside code and message (payment_required: due, currency).
        self.extra = extra or {}


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    code: ErrorCode | None = None
    message: str | None = None
    # The error object's other fields, e.g. `due` and `currency` of payment_required (contract §6).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def error(cls, code: ErrorCode, message: str, **extra: Any) -> Reply:
        return cls(False, {}, code, message, extra)

    def to_json(self, transaction: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"transaction": transaction}
        if self.ok:
            out.update(status="ok", data=self.data)
        else:
            out.update(status="error", error={**self.extra, "code": self.code, "message": self.message})
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Reply:
        if doc.get("status") == "ok":
            return cls(True, dict(doc.get("data") or {}))
        err = dict(doc.get("error") or {})
        code, message = err.pop("code", "unavailable"), err.pop("message", "")
        return cls(False, {}, code, message, err)


@dataclass(frozen=True, slots=True)
class Command:
    # Same key, same answer: request transactions ("tx:<transaction>") and camera event ids ("cam:<id>:<event>").
    idempotency_key: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True, slots=True)
class Enter(Command):
    vehicle: str
    lot: str | None = None
    zone: str | None = None
    type: str | None = None
    gate: str | None = None
    # "rr:<gate>:<plate>": a re-read of the same plate at the same gate within reread_window gets the first decision
    reread_key: str | None = None
    # Sensors the ingress is debouncing a car for when the read came: the store still has their slots vacant, but
    # a car has just parked there (gateway/core/allocation.py passes them over).
    arriving: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Exit(Command):
    vehicle: str | None = None
    session_id: str | None = None
    gate: str | None = None
    candidates: tuple[str, ...] = ()
    reread_key: str | None = None


@dataclass(frozen=True, slots=True)
class Reserve(Command):
    """Hold a slot for [start, end) (epoch seconds); idempotent by `reservation_id`."""

    reservation_id: str
    vehicle: str
    lot: str
    start: float
    end: float
    type: str | None = None
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class CancelReservation(Command):
    reservation_id: str


@dataclass(frozen=True, slots=True)
class Pay(Command):
    """A payment toward an active session: at least what is due now, or refused; idempotent by `payment_ref`."""

    session_id: str
    amount: int
    payment_ref: str


@dataclass(frozen=True, slots=True)
class Block(Command):
    slot: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Unblock(Command):
    slot: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SensorChange:
    """A debounced sensor transition, or the sensor going offline."""

    sensor: str
    state: Literal["vacant", "occupied", "offline"]
    at: float


@dataclass(frozen=True, slots=True)
class SensorChanges(Command):
    """Sensor transitions applied as one command: the ingest path hands them over in batches.

    `arriving`: sensors whose occupancy the ingress is still debouncing when it hands these over (a car that has
    just parked in that slot); the store does not know it yet, but a session whose own slot is one of them is
    not the owner of a car found elsewhere."""

    changes: tuple[SensorChange, ...]
    arriving: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SensorsSeen(Command):
    """The ingress's periodic flush: (sensor, last heard, offline deadline), both on the writer's Timeline."""

    deadlines: tuple[tuple[str, float, float], ...]


@dataclass(frozen=True, slots=True)
class BatteryReport(Command):
    """A sensor's battery crossed its threshold: `low` (alert, at most once a day) or recovered."""

    sensor: str
    volts: float
    threshold: float
    low: bool


@dataclass(frozen=True, slots=True)
class Rearm(Command):
    """At start: deadline rows made to match the sensor and session state (gateway/core/reconcile.py)."""


@dataclass(frozen=True, slots=True)
class RecordRejections(Command):
    """Bad input seen by the drivers: kept in the store (last N) for the operator."""

    items: tuple[tuple[float, str, str, str], ...]  # (at, source, reason, detail)


@dataclass(frozen=True, slots=True)
class Housekeeping(Command):
    """Expire idempotency keys, trim the rejection log and erase old plates."""


@dataclass(frozen=True, slots=True)
class Ping(Command):
    """A round trip through the writer that changes nothing: proof that it makes progress (systemd watchdog)."""


@dataclass(frozen=True, slots=True)
class FireDue(Command):
    """Run the deadlines whose time has come (gateway/core/timers.py)."""


@dataclass(frozen=True, slots=True)
class RaiseAlert(Command):
    """An alert from outside the writer's own decisions (an unknown device, a lane fault)."""

    code: str
    severity: Literal["info", "warning", "critical"]
    subject: dict[str, Any]
    message: str


@dataclass(frozen=True, slots=True)
class ForgetEvents(Command):
    """Outbox entries up to `upto` have reached upstream (their PUBACK arrived): delete them."""

    upto: int


@dataclass(frozen=True, slots=True)
class CompactOutbox(Command):
    """The outbox is past its bound: compact superseded `slot.status` events after `after_seq` (rows up to it
    may be on their way upstream), scanning at most `scan` entries; `announce` raises the `outbox.full` alert."""

    max_bytes: int
    after_seq: int
    scan: int = 1000
    announce: bool = False


GateModeName = Literal["normal", "locked_open", "locked_closed"]
GateEventCode = Literal["passed", "backed_out", "ticket", "forced_open", "fault"]


@dataclass(frozen=True, slots=True)
class GateEvent(Command):
    """A controller EVENT that needs a decision (gateway/core/lanes.py), with its GCP/1 seq: applied once even
    when the controller delivers it again after a gateway restart."""

    gate: str
    code: GateEventCode
    seq: int
    fault_code: int | None = None


@dataclass(frozen=True, slots=True)
class OpenGate(Command):
    """`open_gate` (contract §3.3): a manual open, audited as gate.opened with the request's text as note."""

    gate: str
    actor: str | None
    note: str | None


@dataclass(frozen=True, slots=True)
class SetGateMode(Command):
    gate: str
    mode: GateModeName
    actor: str | None


@dataclass(frozen=True, slots=True)
class GateActuated(Command):
    """The lane is done with these pending opens (the OPEN was acknowledged, or it is too late to send it)."""

    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GateState(Command):
    """What a lane's controller last reported, kept for `status`: written when it changes, never per STATUS."""

    gate: str
    barrier: str
    mode: str
    loops: int  # bit 0 loop A, bit 1 loop B
    online: bool
    heard_at: float | None  # wall time of the last frame heard


@dataclass(frozen=True, slots=True)
class GateAlert(Command):
    """An alert about a lane from its service (offline, online, fault, open too long); a fault is also counted."""

    gate: str
    code: str
    severity: Literal["info", "warning", "critical"]
    message: str


@dataclass(frozen=True, slots=True)
class GateAction:
    """What a committed decision asks of one barrier, done in this order after COMMIT: SET_MODE, OPEN, CLOSE
    (only with both loops clear), DISPLAY. `pending` is the store's row for an OPEN, cleared once it is
    acknowledged; an OPEN not sent by `expires` (the writer's Timeline) is not sent at all."""

    gate: str
    mode: GateModeName | None = None
    open: bool = False
    close: bool = False
    display: str | None = None
    pending: int | None = None
    session_id: str | None = None
    expires: float | None = None
