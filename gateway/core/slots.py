"""Slot status: derived from sessions, blocks and sensor evidence; block and unblock.

A block on an occupied slot applies once it is free (contract §6): `derive_status` puts occupied first, so the
slot stays `occupied` while its session or its sensor holds it and turns `blocked`, never `available`, when freed.
Sensor transitions are decided in gateway/core/reconcile.py.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.core.domain import Block, CommandError, Unblock
from gateway.core.events import SlotState, SlotStatus
from gateway.core.txn import Txn

_RANK = {"vacant": 0, "none": 2, "offline": 4, "occupied": 6}
# Added to the rank of a slot a session on its way was re-seated away from (its car may still be driving there):
# allocated after every other slot of its sensor tier.
DISPLACED = 1
# Added to the rank of a slot with a reservation ahead: walk-ins get every slot without one first.
RESERVED_AHEAD = 8

# The slot's live reservations, one probe of reservations_live_slot: (a hold has begun, one is booked ahead).
HOLDS = (
    "SELECT COALESCE(MAX(state = 'held'), 0), COALESCE(MAX(state = 'booked'), 0) FROM reservations"
    " WHERE slot = ? AND state IN ('booked', 'held')"
)


def derive_status(has_session: bool, blocked: bool, sensor_state: str, held: bool = False) -> SlotState:
    """The one rule for a slot's status; the writer stores it and audit recomputes it.

    `held`: a reservation's hold on the slot has begun. A car in the slot wins over everything (it is there);
    a blocked slot is out of use even when held.
    """
    if has_session or sensor_state == "occupied":
        return "occupied"
    if blocked:
        return "blocked"
    if held:
        return "reserved"
    return "available"


def alloc_rank(sensor_state: str, reserved_ahead: bool = False, displaced: bool = False) -> int:
    return _RANK[sensor_state] + (DISPLACED if displaced else 0) + (RESERVED_AHEAD if reserved_ahead else 0)


def displaced(conn: sqlite3.Connection, slot_id: str) -> bool:
    """A session on its way was re-seated away from this slot and its car may still come (reconcile.py)."""
    return (
        conn.execute(
            "SELECT 1 FROM sessions INDEXED BY sessions_reseated_from WHERE reseated_from = ? AND state = 'active'",
            (slot_id,),
        ).fetchone()
        is not None
    )


def active_session_on(conn: sqlite3.Connection, slot_id: str) -> str | None:
    row = conn.execute("SELECT id FROM sessions WHERE slot = ? AND state = 'active'", (slot_id,)).fetchone()
    return None if row is None else str(row[0])


def refresh(txn: Txn, slot_id: str, reason: str, *, sensor_moved: bool = False) -> None:
    """Recompute a slot's status after a change; emit slot.status when it or the sensor evidence moved."""
    row = txn.conn.execute(
        "SELECT lot, zone, status, blocked, sensor_state, alloc_rank FROM slots WHERE id = ?", (slot_id,)
    ).fetchone()
    if row is None:
        return
    session = active_session_on(txn.conn, slot_id)
    held, ahead = txn.conn.execute(HOLDS, (slot_id,)).fetchone()
    status = derive_status(session is not None, bool(row["blocked"]), row["sensor_state"], bool(held))
    rank = alloc_rank(row["sensor_state"], bool(ahead), displaced(txn.conn, slot_id))
    if status != row["status"]:
        txn.conn.execute(
            "UPDATE slots SET status = ?, since = ?, alloc_rank = ? WHERE id = ?", (status, txn.now, rank, slot_id)
        )
        if "occupied" in (status, row["status"]):
            # Kept for the occupancy factor at entry (gateway/core/exits.py), checked by audit.
            step = 1 if status == "occupied" else -1
            txn.conn.execute("UPDATE lots SET occupied = occupied + ? WHERE id = ?", (step, row["lot"]))
    elif rank != row["alloc_rank"]:
        txn.conn.execute("UPDATE slots SET alloc_rank = ? WHERE id = ?", (rank, slot_id))
    if status != row["status"] or sensor_moved:
        txn.emit(
            SlotStatus(
                slot=slot_id, lot=row["lot"], zone=row["zone"], status=status, sensor=row["sensor_state"], reason=reason
            )
        )


def _slot(txn: Txn, slot_id: str) -> sqlite3.Row:
    row: sqlite3.Row | None = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (slot_id,)).fetchone()
    if row is None:
        raise CommandError("unknown_slot", f"no slot {slot_id!r}")
    return row


def block(txn: Txn, cmd: Block) -> dict[str, Any]:
    _slot(txn, cmd.slot)
    txn.conn.execute("UPDATE slots SET blocked = 1, block_reason = ? WHERE id = ?", (cmd.reason, cmd.slot))
    refresh(txn, cmd.slot, "blocked")
    return {}


def unblock(txn: Txn, cmd: Unblock) -> dict[str, Any]:
    _slot(txn, cmd.slot)
    txn.conn.execute("UPDATE slots SET blocked = 0, block_reason = NULL WHERE id = ?", (cmd.slot,))
    refresh(txn, cmd.slot, "unblocked")
    return {}
