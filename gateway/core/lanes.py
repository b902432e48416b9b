"""Barrier lanes: what a gate with a serial controller decides (contract §6 Entry and Exit, §3.3, §5).

An `Enter` or `Exit` at such a gate is decided as anywhere else (`allocation`, `exits`); this module adds, in the
same transaction, what the barrier is to do once it commits (`Txn.actions`: OPEN, then DISPLAY the slot; or the
sign alone: `FULL`, what is due, ...). Every OPEN the gateway commands is audited by a `gate.opened` event and
kept as a row of `gate_actions` until the lane reports it acknowledged, so that an OPEN lost to a crash or an
unplugged cable is sent again (an entry's until its pass timeout, which cancels the session instead).

An entry waits for the vehicle to pass: a `lane.pass_timeout` deadline (gateway/core/timers.py) cancels it when
the controller reports no pass in time; "passed" confirms it, "backed out" cancels it. Controller events are
applied once: the `gate_events` rows remember the last ones by their GCP/1 seq, across gateway restarts.
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any, Literal

from gateway.core import allocation, exits, reconcile, slots, timers
from gateway.core.domain import (
    CommandError,
    Enter,
    Exit,
    GateAction,
    GateActuated,
    GateAlert,
    GateEvent,
    GateState,
    OpenGate,
    SetGateMode,
)
from gateway.core.events import GateMode, GateOpened, SessionCancelled, SessionConfirmed
from gateway.core.plates import reread_key
from gateway.core.settings import GateInfo
from gateway.core.txn import Txn

PASS_TIMEOUT = "lane.pass_timeout"
# An exit's or a manual OPEN that could not be sent (controller unreachable, gateway down) is still sent this
# long after the decision; later, the car has gone another way.
OPEN_TTL_S = 600.0
# Controller events remembered per gate, and for how long: a redelivery after a gateway restart is one of them.
EVENTS_KEPT = 8
EVENT_MEMORY_S = 600.0
# Tickets: letters and digits that no confusion merge (O/0/D/Q, I/1, S/5, B/8, Z/2) maps onto another.
TICKET_CHARS = "ACEFGHJKLMNPRTUVWXY34679"
TICKET_LEN = 15  # after the "T": 24**15, about 2**69

SIGN_CLOSED = "CLOSED"
SIGN_FULL = "FULL"
SIGN_NO_ENTRY = "NO ENTRY"
SIGN_EXIT = "THANK YOU"
SIGN_UNMATCHED = "SEE ATTENDANT"
SIGN_MAX = 32
# ISO 4217 minor units where they are not 2.
_EXPONENT = {"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0, "BHD": 3, "JOD": 3, "KWD": 3, "OMR": 3, "TND": 3}


def barrier_gate(txn: Txn, gate_id: str | None, direction: str) -> GateInfo | None:
    """The gate when it has a barrier controller and serves `direction`; else None (no lane to drive)."""
    gate = txn.settings.gates.get(gate_id) if gate_id is not None else None
    if gate is None or not gate.has_loops or gate.direction != direction:
        return None
    return gate


def mode_of(conn: sqlite3.Connection, gate_id: str) -> str:
    row = conn.execute("SELECT mode FROM gates WHERE id = ?", (gate_id,)).fetchone()
    return "normal" if row is None else str(row[0])


def sign_text(text: str) -> str:
    """What a GCP/1 DISPLAY can carry: printable ASCII, at most 32 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:SIGN_MAX]


def money(amount: int, currency: str | None) -> str:
    """`350, "EUR"` -> `3.50 EUR`, in the currency's minor units."""
    exp = _EXPONENT.get(currency or "", 2)
    sign, amount = ("-", -amount) if amount < 0 else ("", amount)
    whole = f"{sign}{amount // 10**exp}" + (f".{amount % 10**exp:0{exp}d}" if exp else "")
    return f"{whole} {currency}" if currency else whole


def new_ticket() -> str:
    """A ticket number for an entry by the ticket button: unique in practice and not guessable from outside."""
    return "T" + "".join(secrets.choice(TICKET_CHARS) for _ in range(TICKET_LEN))


def _sign(txn: Txn, gate: str, text: str) -> None:
    txn.actions.append(GateAction(gate, display=sign_text(text)))


def _open(
    txn: Txn,
    gate: str,
    reason: Literal["entry", "exit", "manual"],
    *,
    expires: float,
    session_id: str | None = None,
    actor: str | None = None,
    note: str | None = None,
    display: str | None = None,
) -> None:
    """Audit the open and keep it pending until the lane reports the OPEN acknowledged."""
    cur = txn.conn.execute(
        "INSERT INTO gate_actions (gate, reason, session_id, display, expires, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (gate, reason, session_id, display, expires, txn.now),
    )
    txn.emit(GateOpened(gate=gate, reason=reason, actor=actor, session_id=session_id, note=note))
    txn.actions.append(
        GateAction(gate, open=True, display=display, pending=cur.lastrowid, session_id=session_id, expires=expires)
    )


def _refuse_locked(txn: Txn, gate: str) -> None:
    if mode_of(txn.conn, gate) == "locked_closed":
        _sign(txn, gate, SIGN_CLOSED)
        raise CommandError("unavailable", f"gate {gate!r} is locked closed", keep_effects=True)


def enter(txn: Txn, cmd: Enter) -> dict[str, Any]:
    """`Enter`: decided by allocation; at a barrier gate the barrier opens and the entry waits for the pass."""
    gate = barrier_gate(txn, cmd.gate, "entry")
    if gate is None:
        return allocation.enter(txn, cmd)
    _refuse_locked(txn, gate.id)
    try:
        result = allocation.enter(txn, cmd)
    except CommandError as exc:
        if exc.keep_effects:  # a denial: full, denied, already_active
            _sign(txn, gate.id, SIGN_FULL if exc.code == "full" else SIGN_NO_ENTRY)
        raise
    session_id, slot = result["session_id"], result["slot"]
    if result.get("existing"):
        # Soft anti-passback: the vehicle is let in on the session it has, which is not waiting for a pass.
        _open(txn, gate.id, "entry", expires=txn.timer_now + OPEN_TTL_S, session_id=session_id, display=slot)
        return result
    due = txn.timer_now + txn.settings.pass_timeout
    timers.schedule(txn, PASS_TIMEOUT, session_id, due)
    _open(txn, gate.id, "entry", expires=due, session_id=session_id, display=slot or "")
    return result


def exit_(txn: Txn, cmd: Exit) -> dict[str, Any]:
    """`Exit`: decided by exits (matching, fee, payment policy); at a barrier gate an exit that ends opens, a
    refused one keeps the barrier closed and the sign says why."""
    gate = barrier_gate(txn, cmd.gate, "exit")
    if gate is None:
        return exits.exit_(txn, cmd)
    _refuse_locked(txn, gate.id)
    try:
        result = exits.exit_(txn, cmd)
    except CommandError as exc:
        if exc.code == "payment_required":
            _sign(txn, gate.id, f"PAY {money(int(exc.extra.get('due', 0)), exc.extra.get('currency'))}")
        elif exc.code == "unknown_session" and exc.keep_effects:  # exit.unmatched
            _sign(txn, gate.id, SIGN_UNMATCHED)
        raise
    _open(txn, gate.id, "exit", expires=txn.timer_now + OPEN_TTL_S, session_id=result["session_id"], display=SIGN_EXIT)
    return result


def _waiting_entry(txn: Txn, gate: str) -> sqlite3.Row | None:
    """The oldest entry at `gate` whose vehicle has not passed yet (one car is on the loop at a time)."""
    row: sqlite3.Row | None = txn.conn.execute(
        "SELECT id, slot FROM sessions INDEXED BY sessions_unconfirmed"
        " WHERE entry_gate = ? AND state = 'active' AND confirmed_at IS NULL ORDER BY started_at LIMIT 1",
        (gate,),
    ).fetchone()
    return row


def _settled(txn: Txn, session_id: str) -> None:
    timers.cancel(txn, PASS_TIMEOUT, session_id)
    txn.conn.execute("DELETE FROM gate_actions WHERE session_id = ?", (session_id,))


def _confirm(txn: Txn, session: sqlite3.Row, gate: str) -> None:
    txn.conn.execute("UPDATE sessions SET confirmed_at = ? WHERE id = ?", (txn.now, session["id"]))
    txn.emit(SessionConfirmed(session_id=session["id"], gate=gate))
    reconcile.session_confirmed(txn, session["id"])
    _settled(txn, session["id"])


def cancel_entry(txn: Txn, session_id: str, slot: str | None, reason: Literal["pass_timeout", "backed_out"]) -> None:
    """The vehicle did not come in: the session is cancelled and its slot freed. The re-read window of its plate
    at that gate ends with it: the car coming back is a new decision, not a replay of the cancelled one."""
    row = txn.conn.execute("SELECT plate, entry_gate FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is not None and row["plate"] is not None and row["entry_gate"] is not None:
        txn.conn.execute("DELETE FROM idempotency WHERE key = ?", (reread_key(row["entry_gate"], row["plate"]),))
    txn.conn.execute("UPDATE sessions SET state = 'cancelled', ended_at = ? WHERE id = ?", (txn.now, session_id))
    txn.emit(SessionCancelled(session_id=session_id, slot=slot, reason=reason))
    _settled(txn, session_id)
    if slot is not None:
        slots.refresh(txn, slot, "session.cancelled")
    reconcile.session_closed(txn, session_id, slot)


@timers.on_due(PASS_TIMEOUT)
def _pass_timeout(txn: Txn, session_id: str) -> None:
    row = txn.conn.execute(
        "SELECT slot FROM sessions WHERE id = ? AND state = 'active' AND confirmed_at IS NULL", (session_id,)
    ).fetchone()
    if row is not None:
        cancel_entry(txn, session_id, row["slot"], "pass_timeout")


def _seen(txn: Txn, cmd: GateEvent) -> bool:
    """Whether this event was applied already (a redelivery); otherwise remember it."""
    what = f"{cmd.code}:{cmd.fault_code}"
    row = txn.conn.execute(
        "SELECT event, at FROM gate_events WHERE gate = ? AND seq = ?", (cmd.gate, cmd.seq)
    ).fetchone()
    if row is not None and row[0] == what and row[1] >= txn.timer_now - EVENT_MEMORY_S:
        return True
    txn.conn.execute(
        "INSERT INTO gate_events (gate, seq, event, at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (gate, seq) DO UPDATE SET event = excluded.event, at = excluded.at",
        (cmd.gate, cmd.seq, what, txn.timer_now),
    )
    txn.conn.execute(
        "DELETE FROM gate_events WHERE gate = ? AND seq NOT IN"
        " (SELECT seq FROM gate_events WHERE gate = ? ORDER BY at DESC LIMIT ?)",
        (cmd.gate, cmd.gate, EVENTS_KEPT),
    )
    return False


def gate_event(txn: Txn, cmd: GateEvent) -> dict[str, Any]:
    """Apply a controller event once; the reply says what it did (the lane acts on `close`)."""
    gate = txn.settings.gates.get(cmd.gate)
    if gate is None or not gate.has_loops:
        raise CommandError("invalid_request", f"gate {cmd.gate!r} has no barrier controller")
    if _seen(txn, cmd):
        return {"applied": False}
    entry = gate.direction == "entry"
    out: dict[str, Any] = {"applied": True}
    if cmd.code in ("passed", "backed_out") and entry:
        waiting = _waiting_entry(txn, gate.id)
        if waiting is not None:
            out["session_id"] = waiting["id"]
            if cmd.code == "passed":
                _confirm(txn, waiting, gate.id)
            else:
                cancel_entry(txn, waiting["id"], waiting["slot"], "backed_out")
                # Nobody is coming through on that decision: close the barrier, if the loops are clear.
                txn.actions.append(GateAction(gate.id, close=True))
    elif cmd.code == "ticket" and entry:
        ticket = new_ticket()
        out["ticket"] = ticket
        try:
            out.update(enter(txn, Enter(vehicle=ticket, gate=gate.id)))
        except CommandError as exc:
            if not exc.keep_effects:
                raise
            out["refused"] = exc.code  # entry.denied (and the sign) are kept; the press was handled
    elif cmd.code == "forced_open":
        txn.alert("gate.forced_open", "warning", {"gate": gate.id}, "the barrier was forced open")
    elif cmd.code == "fault":
        _fault(txn, gate.id, f"the controller reports fault {cmd.fault_code}")
    return out


def _fault(txn: Txn, gate: str, message: str) -> None:
    txn.alert("gate.fault", "critical", {"gate": gate}, message)
    txn.conn.execute(
        "UPDATE gates SET faults = faults + 1, last_fault = ?, last_fault_at = ? WHERE id = ?", (message, txn.now, gate)
    )


def _barrier(txn: Txn, gate_id: str) -> GateInfo:
    gate = txn.settings.gates.get(gate_id)
    if gate is None:
        raise CommandError("invalid_request", f"unknown gate {gate_id!r}")
    if not gate.has_loops:
        raise CommandError("invalid_request", f"gate {gate_id!r} has no barrier controller")
    return gate


def open_gate(txn: Txn, cmd: OpenGate) -> dict[str, Any]:
    gate = _barrier(txn, cmd.gate)
    if mode_of(txn.conn, gate.id) == "locked_closed":
        raise CommandError("conflict", f"gate {gate.id!r} is locked closed; set its mode to normal first")
    _open(txn, gate.id, "manual", expires=txn.timer_now + OPEN_TTL_S, actor=cmd.actor, note=cmd.note)
    return {}


def set_gate_mode(txn: Txn, cmd: SetGateMode) -> dict[str, Any]:
    gate = _barrier(txn, cmd.gate)
    txn.conn.execute("UPDATE gates SET mode = ? WHERE id = ?", (cmd.mode, gate.id))
    txn.emit(GateMode(gate=gate.id, mode=cmd.mode, actor=cmd.actor))
    txn.actions.append(GateAction(gate.id, mode=cmd.mode))
    return {}


def actuated(txn: Txn, cmd: GateActuated) -> dict[str, Any]:
    txn.conn.executemany("DELETE FROM gate_actions WHERE id = ?", [(i,) for i in cmd.ids])
    return {}


def gate_state(txn: Txn, cmd: GateState) -> dict[str, Any]:
    txn.conn.execute(
        "UPDATE gates SET barrier = ?, reported_mode = ?, loops = ?, online = ?, heard_at = ?, changed_at = ?"
        " WHERE id = ?",
        (cmd.barrier, cmd.mode, cmd.loops, cmd.online, cmd.heard_at, txn.now, cmd.gate),
    )
    return {}


def gate_alert(txn: Txn, cmd: GateAlert) -> dict[str, Any]:
    _barrier(txn, cmd.gate)
    if cmd.code == "gate.fault":
        _fault(txn, cmd.gate, cmd.message)
    else:
        txn.alert(cmd.code, cmd.severity, {"gate": cmd.gate}, cmd.message)
    return {}
