"""Where an exit is decided: match the plate to one active session, end it, free the slot."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from gateway.core import slots
from gateway.core.domain import CommandError, Exit
from gateway.core.events import ExitUnmatched, Fee, SessionEnded
from gateway.core.plates import PlateError, confusion_key, normalise, within_one_edit
from gateway.core.pricing import fee
from gateway.core.txn import Txn


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
    duration = max(0, round(txn.now - session["started_at"]))
    tariff = txn.settings.tariffs.get(session["lot"])
    amount = fee(tariff, session["started_at"], txn.now, 1)
    currency = tariff.currency if tariff is not None else None
    txn.conn.execute(
        "UPDATE sessions SET state = 'ended', ended_at = ?, exit_gate = ?, duration_s = ?, fee_amount = ?,"
        " fee_currency = ? WHERE id = ?",
        (txn.now, cmd.gate, duration, amount, currency, session["id"]),
    )
    charged = Fee(amount=amount, currency=currency)
    txn.emit(
        SessionEnded(
            session_id=session["id"],
            lot=session["lot"],
            slot=session["slot"],
            vehicle=txn.vehicle_ref(session["plate"] or session["vehicle"], session["vehicle"]),
            gate=cmd.gate,
            duration_s=duration,
            fee=charged,
        )
    )
    if session["slot"] is not None:
        slots.refresh(txn, session["slot"], "session.ended")
    fee_doc = {"amount": amount, "currency": currency}
    return {"session_id": session["id"], "slot": session["slot"], "duration_s": duration, "fee": fee_doc}
