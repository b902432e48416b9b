"""Deadlines as data: what must happen later is a row in the store, found by an indexed query when due.

A restart forgets no timer: the writer's `FireDue` command runs the handler of every row whose time has come,
in the same transaction as what the handler decides. Two time bases:

- `timer` (the default): durations — a pass timeout, a vacate grace, a sensor going offline. `due` is on the
  writer's `Timeline` (wall time at start plus monotonic time since), so a wall-clock step (NTP on a Pi without
  RTC) neither fires nor stalls them.
- `wall`: appointments — a reservation's start or end, given as wall-clock times. They follow the wall clock,
  steps included: the appointment is at that time of day.

Kinds register a handler with `@on_due("kind")`; the handler gets the transaction and the row's subject and may
schedule again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from gateway.core.domain import FireDue
from gateway.core.txn import Txn

Base = Literal["timer", "wall"]
DueHandler = Callable[[Txn, str], None]

_HANDLERS: dict[str, DueHandler] = {}
# Most rows one FireDue runs; the rest are due again at once and come in the next commit.
FIRE_BATCH = 256


def on_due(kind: str) -> Callable[[DueHandler], DueHandler]:
    """Register the handler of a kind of deadline (once per kind, at import time)."""

    def register(handler: DueHandler) -> DueHandler:
        if _HANDLERS.get(kind, handler) is not handler:
            raise ValueError(f"a handler for deadline kind {kind!r} is already registered")
        _HANDLERS[kind] = handler
        return handler

    return register


def schedule(txn: Txn, kind: str, subject: str, due: float, *, base: Base = "timer") -> None:
    """Set (or move) the deadline of (kind, subject)."""
    txn.conn.execute(
        "INSERT INTO deadlines (kind, subject, due, wall) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (kind, subject) DO UPDATE SET due = excluded.due, wall = excluded.wall",
        (kind, subject, due, base == "wall"),
    )
    txn.deadlines_changed = True


def cancel(txn: Txn, kind: str, subject: str) -> None:
    if txn.conn.execute("DELETE FROM deadlines WHERE kind = ? AND subject = ?", (kind, subject)).rowcount:
        txn.deadlines_changed = True


def due_at(txn: Txn, kind: str, subject: str) -> float | None:
    row = txn.conn.execute("SELECT due FROM deadlines WHERE kind = ? AND subject = ?", (kind, subject)).fetchone()
    return None if row is None else float(row[0])


def fire_due(txn: Txn, _cmd: FireDue) -> dict[str, Any]:
    """Run every deadline that has come, oldest first; each row is deleted before its handler runs. A row that an
    earlier handler of the batch cancelled or moved past now does not run."""
    rows = txn.conn.execute(
        "SELECT kind, subject FROM (SELECT kind, subject, due FROM deadlines WHERE wall = 0 AND due <= ?"
        " UNION ALL SELECT kind, subject, due FROM deadlines WHERE wall = 1 AND due <= ?) ORDER BY due LIMIT ?",
        (txn.timer_now, txn.now, FIRE_BATCH),
    ).fetchall()
    fired: dict[str, int] = {}
    for kind, subject in rows:
        still_due = txn.conn.execute(
            "DELETE FROM deadlines WHERE kind = ? AND subject = ? AND due <= CASE wall WHEN 1 THEN ? ELSE ? END",
            (kind, subject, txn.now, txn.timer_now),
        ).rowcount
        if not still_due:
            continue
        handler = _HANDLERS.get(kind)
        if handler is not None:  # a kind whose feature was removed from the config: the row just goes
            handler(txn, subject)
        fired[kind] = fired.get(kind, 0) + 1
    if rows:
        txn.deadlines_changed = True
    return {"fired": fired}


def next_due(txn: Txn) -> tuple[float | None, float | None]:
    """The earliest (timer, wall) deadline, each None when there is none."""
    timer = txn.conn.execute("SELECT MIN(due) FROM deadlines WHERE wall = 0").fetchone()[0]
    wall = txn.conn.execute("SELECT MIN(due) FROM deadlines WHERE wall = 1").fetchone()[0]
    return timer, wall
