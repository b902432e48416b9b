"""Where an exit is decided: match the plate to one active session, settle what is due, end it, free the slot.

`settle` is the one answer to "may this exit open, and what happens": the `Exit` command uses it, whoever sends
that command (a camera read, an `exit` request, a barrier lane). `charges` is the pure arithmetic behind it, also
used by `quote` on the read side and by `pay`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from gateway.core import reconcile, slots
from gateway.core.clock import iso_ms
from gateway.core.domain import CommandError, Exit, Pay
from gateway.core.events import ExitUnmatched, Fee, PaymentConfirmed, PaymentRequested, SessionEnded
from gateway.core.plates import PlateError, confusion_key, normalise, within_one_edit
from gateway.core.pricing import fee
from gateway.core.settings import Settings, Tariff
from gateway.core.txn import Txn


class SessionRow(Protocol):
    """A session as stored (an sqlite3.Row or a dict of its columns)."""

    def __getitem__(self, key: str, /) -> Any: ...


def elapsed_s(started_at: float, now: float) -> int:
    """Whole seconds, half up: `duration_s` of session.ended, and the duration the fee is computed for."""
    return max(0, math.floor(now - started_at + 0.5))


@dataclass(frozen=True, slots=True)
class Charges:
    """What a session owes at a moment (contract §6, "Fees and payment"); money in integer minor units."""

    amount: int  # the session's whole fee: as of now, or within paid_until as of the last payment
    currency: str | None
    paid: int
    due: int
    paid_until: float | None
    duration_s: int


def charges(tariff: Tariff | None, session: SessionRow, now: float) -> Charges:
    """The fee from the session's entry to `now` at its stored occupancy factor, less what was paid.

    Within `paid_until` nothing more is due, even if an hour started during the grace: the whole fee is the one
    paid for. The fee is computed for the same whole seconds as `duration_s`, so the two always agree.
    """
    started, paid, paid_until = session["started_at"], int(session["paid"]), session["paid_until"]
    grace = paid_until is not None and now <= paid_until
    basis = session["paid_at"] if grace else now
    amount = fee(tariff, started, started + elapsed_s(started, basis), Fraction(session["factor"]))
    due = 0 if grace else max(0, amount - paid)
    currency = tariff.currency if tariff is not None else None
    return Charges(amount, currency, paid, due, paid_until, elapsed_s(started, now))


@dataclass(frozen=True, slots=True)
class ExitDecision:
    """`opens`: the barrier may open and the session ends; else the exit is refused `payment_required`.

    `billed`: what `payment.requested` carries (bill_later), 0 when nothing is unpaid.
    """

    opens: bool
    charges: Charges
    billed: int = 0


def settle(settings: Settings, session: SessionRow, now: float) -> ExitDecision:
    """May this session's exit open now, and what happens: the lot's tariff, then `[policy] exit_unpaid`."""
    c = charges(settings.tariffs.get(session["lot"]), session, now)
    if c.due == 0:
        return ExitDecision(True, c)
    if settings.exit_unpaid == "bill_later":
        return ExitDecision(True, c, billed=c.due)
    return ExitDecision(False, c)


def payment_required(c: Charges, *, keep_effects: bool) -> CommandError:
    money = f"{c.due} {c.currency}" if c.currency else str(c.due)
    return CommandError(
        "payment_required", f"{money} due", keep_effects=keep_effects, extra={"due": c.due, "currency": c.currency}
    )


def match_plate(active: list[tuple[str, str]], plate: str, candidates: tuple[str, ...]) -> str | None:
    """Contract §6: exact, then candidates, then confusion-merged, then one edit; only a unique match counts."""
    stages: list[Callable[[str], bool]] = [
        lambda p: p == plate,
        lambda p: p in candidates,
        lambda p: confusion_key(p) == confusion_key(plate),
        lambda p: within_one_edit(p, plate),
    ]
    for accept in stages:
        hits = {sid for sid, p in active if accept(p)}
        if len(hits) == 1:
            return hits.pop()
        if len(hits) > 1:
            return None
    return None


def _normalised_candidates(raw: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for c in raw:
        try:
            out.append(normalise(c))
        except PlateError:
            continue
    return tuple(out)


def _find_session(txn: Txn, cmd: Exit, lot: str | None) -> sqlite3.Row:
    if cmd.session_id is not None:
        row: sqlite3.Row | None = txn.conn.execute(
            "SELECT * FROM sessions WHERE id = ? AND state = 'active'", (cmd.session_id,)
        ).fetchone()
        if row is None:
            raise CommandError("unknown_session", f"no active session {cmd.session_id!r}")
        return row
    if cmd.vehicle is None:
        raise CommandError("invalid_request", "vehicle or session_id is required")
    try:
        plate = normalise(cmd.vehicle)
    except PlateError as exc:
        raise CommandError("invalid_request", f"vehicle: {exc}") from None
    where, args = ("state = 'active'", ()) if lot is None else ("lot = ? AND state = 'active'", (lot,))
    exact: list[sqlite3.Row] = txn.conn.execute(
        f"SELECT * FROM sessions WHERE {where} AND plate = ?", (*args, plate)
    ).fetchall()
    if len(exact) == 1:
        return exact[0]
    session_id = None
    if not exact:
        active = [(r[0], r[1]) for r in txn.conn.execute(f"SELECT id, plate FROM sessions WHERE {where}", args)]
        session_id = match_plate(
            [(sid, p) for sid, p in active if p is not None], plate, _normalised_candidates(cmd.candidates)
        )
    if session_id is None:
        if cmd.gate is not None:
            vehicle = txn.vehicle_ref(plate, txn.key.token(plate))
            txn.emit(ExitUnmatched(gate=cmd.gate, vehicle=vehicle))
        raise CommandError("unknown_session", "no unique active session matches this vehicle", keep_effects=True)
    found: sqlite3.Row = txn.conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    return found


def exit_(txn: Txn, cmd: Exit) -> dict[str, Any]:
    lot = None
    if cmd.gate is not None:
        gate = txn.settings.gates.get(cmd.gate)
        if gate is None:
            raise CommandError("invalid_request", f"unknown gate {cmd.gate!r}")
        if gate.direction != "exit":
            raise CommandError("invalid_request", f"gate {cmd.gate!r} is an entry")
        lot = gate.lot
    session = _find_session(txn, cmd, lot)
    decision = settle(txn.settings, session, txn.now)
    c = decision.charges
    if not decision.opens:
        if cmd.reread_key is not None:
            # Re-reads of this plate get this refusal until a payment ends the window (see pay).
            txn.conn.execute(
                "INSERT OR REPLACE INTO exit_refusals (key, session_id) VALUES (?, ?)", (cmd.reread_key, session["id"])
            )
        raise payment_required(c, keep_effects=True)
    txn.conn.execute(
        "UPDATE sessions SET state = 'ended', ended_at = ?, exit_gate = ?, duration_s = ?, fee_amount = ?,"
        " fee_currency = ? WHERE id = ?",
        (txn.now, cmd.gate, c.duration_s, c.amount, c.currency, session["id"]),
    )
    txn.emit(
        SessionEnded(
            session_id=session["id"],
            lot=session["lot"],
            slot=session["slot"],
            vehicle=txn.vehicle_ref(session["plate"] or session["vehicle"], session["vehicle"]),
            gate=cmd.gate,
            duration_s=c.duration_s,
            fee=Fee(amount=c.amount, currency=c.currency),
        )
    )
    if decision.billed:
        txn.emit(
            PaymentRequested(
                session_id=session["id"], amount=decision.billed, currency=c.currency, idempotency_key=session["id"]
            )
        )
    txn.conn.execute("DELETE FROM exit_refusals WHERE session_id = ?", (session["id"],))
    if session["slot"] is not None:
        slots.refresh(txn, session["slot"], "session.ended")
    reconcile.session_closed(txn, session["id"], session["slot"])
    fee_doc = {"amount": c.amount, "currency": c.currency}
    return {"session_id": session["id"], "slot": session["slot"], "duration_s": c.duration_s, "fee": fee_doc}


def pay(txn: Txn, cmd: Pay) -> dict[str, Any]:
    """Record a payment of at least what is due now; the same payment_ref always gets the first answer."""
    known = txn.conn.execute("SELECT reply FROM payments WHERE payment_ref = ?", (cmd.payment_ref,)).fetchone()
    if known is not None:
        first: dict[str, Any] = json.loads(known[0])
        return first
    if cmd.amount < 0:
        raise CommandError("invalid_request", "amount must not be negative")
    session = txn.conn.execute("SELECT * FROM sessions WHERE id = ? AND state = 'active'", (cmd.session_id,)).fetchone()
    if session is None:
        raise CommandError("unknown_session", f"no active session {cmd.session_id!r}")
    tariff = txn.settings.tariffs.get(session["lot"])
    c = charges(tariff, session, txn.now)
    if cmd.amount < c.due:
        raise payment_required(c, keep_effects=False)  # a short payment records nothing
    grace = 60.0 * (tariff.exit_grace_minutes if tariff is not None else 0)
    paid_until = txn.now + grace
    txn.conn.execute(
        "UPDATE sessions SET paid = paid + ?, paid_at = ?, paid_until = ? WHERE id = ?",
        (cmd.amount, txn.now, paid_until, session["id"]),
    )
    txn.emit(
        PaymentConfirmed(
            session_id=session["id"],
            amount=cmd.amount,
            currency=c.currency,
            idempotency_key=session["id"],
            payment_ref=cmd.payment_ref,
        )
    )
    # A payment ends the re-read window of this vehicle's refused exits: its next read is a new decision.
    txn.conn.execute(
        "DELETE FROM idempotency WHERE key IN (SELECT key FROM exit_refusals WHERE session_id = ?)", (session["id"],)
    )
    txn.conn.execute("DELETE FROM exit_refusals WHERE session_id = ?", (session["id"],))
    reply = {"paid_until": iso_ms(paid_until)}
    txn.conn.execute(
        "INSERT INTO payments (payment_ref, session_id, amount, at, reply) VALUES (?, ?, ?, ?, ?)",
        (cmd.payment_ref, session["id"], cmd.amount, txn.now, json.dumps(reply)),
    )
    return reply
