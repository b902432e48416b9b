"""Where an entry is decided: denylist, anti-passback, then a slot by zone, type and fill order."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

from gateway.core import reconcile, reservations, slots
from gateway.core.domain import CommandError, Enter
from gateway.core.events import DenyReason, EntryDenied, SessionConfirmed, SessionStarted
from gateway.core.plates import PlateError, normalise
from gateway.core.pricing import band_factor
from gateway.core.txn import Txn

# One indexed probe per candidate type: (lot, [zone,] type, status) is an index prefix and ORDER BY follows the
# index, so the cost is O(log slots) whatever the size of the lot.
_PICK_ANY_ZONE = (
    "SELECT id, zone, sensor FROM slots INDEXED BY slots_alloc_type"
    " WHERE lot = ? AND type = ? AND status = 'available' ORDER BY alloc_rank, fill_order LIMIT ?"
)
_PICK_IN_ZONE = (
    "SELECT id, zone, sensor FROM slots INDEXED BY slots_alloc_zone"
    " WHERE lot = ? AND zone = ? AND type = ? AND status = 'available' ORDER BY alloc_rank, fill_order LIMIT ?"
)
# How many of the best slots are looked at for one whose sensor is not debouncing a car (`Enter.arriving`).
ARRIVING_SCAN = 8


def candidate_types(txn: Txn, lot: str, plate: str, requested: str | None) -> list[str]:
    """Types to try, best first: the requested one; else the vehicle's permits, then unrestricted types."""
    lot_types = txn.settings.types.get(lot, ())
    if requested is not None:
        if requested not in lot_types:
            raise CommandError("invalid_request", f"lot {lot!r} has no slots of type {requested!r}")
        return [requested]
    permitted = [t for t in txn.settings.permits.get(plate, ()) if t in lot_types]
    open_types = [t for t in lot_types if t not in txn.settings.restricted_types and t not in permitted]
    open_types.sort(key=lambda t: (t != "standard", lot_types.index(t)))
    return permitted + open_types


def pick_slot(
    conn: sqlite3.Connection, lot: str, zone: str | None, types: list[str], arriving: frozenset[str] = frozenset()
) -> tuple[str, str] | None:
    """The best free slot of the first type that has one. A slot whose sensor is `arriving` (a car has just parked
    there, not yet past the debounce) is passed over for the next of the ARRIVING_SCAN best: the car sent there
    would find it taken, park elsewhere, and the car standing there would be taken for its."""
    limit = ARRIVING_SCAN if arriving else 1
    for type_ in types:
        if zone is None:
            rows = conn.execute(_PICK_ANY_ZONE, (lot, type_, limit)).fetchall()
        else:
            rows = conn.execute(_PICK_IN_ZONE, (lot, zone, type_, limit)).fetchall()
        if rows:
            row = next((r for r in rows if r[2] not in arriving), rows[0])
            return str(row[0]), str(row[1])
    return None


def entry_factor(txn: Txn, lot: str) -> str:
    """The occupancy band's factor as the lot is just before this entry, as exact text (`"5/4"`)."""
    tariff = txn.settings.tariffs.get(lot)
    if tariff is None or not tariff.occupancy_multipliers:
        return "1"
    occupied, total = txn.conn.execute("SELECT occupied, total FROM lots WHERE id = ?", (lot,)).fetchone()
    return str(band_factor(tariff, occupied, total))


def _lot_of(txn: Txn, cmd: Enter) -> str:
    lot = cmd.lot
    if cmd.gate is not None:
        gate = txn.settings.gates.get(cmd.gate)
        if gate is None:
            raise CommandError("invalid_request", f"unknown gate {cmd.gate!r}")
        if gate.direction != "entry":
            raise CommandError("invalid_request", f"gate {cmd.gate!r} is an exit")
        if lot is not None and lot != gate.lot:
            raise CommandError("invalid_request", f"gate {cmd.gate!r} belongs to lot {gate.lot!r}, not {lot!r}")
        lot = gate.lot
    if lot is None:
        raise CommandError("invalid_request", "lot is required (or a gate)")
    if lot not in txn.settings.lots:
        raise CommandError("unknown_lot", f"no lot {lot!r}")
    return lot


def enter(txn: Txn, cmd: Enter) -> dict[str, Any]:
    lot = _lot_of(txn, cmd)
    if cmd.zone is not None and cmd.zone not in txn.settings.zones.get(lot, frozenset()):
        raise CommandError("invalid_request", f"lot {lot!r} has no zone {cmd.zone!r}")
    try:
        plate = normalise(cmd.vehicle)
    except PlateError as exc:
        raise CommandError("invalid_request", f"vehicle: {exc}") from None
    token = txn.key.token(plate)
    vehicle = txn.vehicle_ref(plate, token)

    def deny(reason: DenyReason, message: str) -> CommandError:
        # Each denial reason is also the reply's error code.
        txn.emit(EntryDenied(lot=lot, gate=cmd.gate, vehicle=vehicle, reason=reason))
        return CommandError(reason, message, keep_effects=True)

    if plate in txn.settings.deny:
        raise deny("denied", "vehicle is on the deny list")
    existing = txn.conn.execute(
        "SELECT id, slot, zone FROM sessions WHERE lot = ? AND vehicle = ? AND state = 'active'", (lot, token)
    ).fetchone()
    if existing is not None:
        if txn.settings.anti_passback == "hard":
            raise deny("already_active", f"vehicle already has session {existing['id']}")
        txn.alert(
            "session.passback",
            "warning",
            {"session": existing["id"], "lot": lot},
            "entry by a vehicle that already has an active session; the existing session is kept",
        )
        return {"session_id": existing["id"], "slot": existing["slot"], "zone": existing["zone"], "existing": True}
    reservation = reservations.arriving(txn, lot, token)
    picked = None if reservation is None else reservations.claim(txn, reservation)
    if picked is None:
        # No reservation, or its slot is in use and none of its kind is free for it: seated as a walk-in.
        picked = pick_slot(txn.conn, lot, cmd.zone, candidate_types(txn, lot, plate, cmd.type), cmd.arriving)
        if picked is None:
            raise deny("full", "no free slot matches")
    slot_id, zone = picked
    reservation_id: str | None = None
    if reservation is not None:
        reservation_id = reservation["id"]
        reservations.announce_arrival(txn, reservation_id, slot_id)
    session_id = str(uuid.uuid4())
    gate = txn.settings.gates.get(cmd.gate) if cmd.gate is not None else None
    confirmed_now = gate is None or not gate.has_loops
    txn.conn.execute(
        "INSERT INTO sessions (id, lot, zone, home_zone, slot, plate, vehicle, state, entry_gate, reservation_id,"
        " started_at, confirmed_at, factor) VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?)",
        (
            session_id, lot, zone, zone, slot_id, plate, token, cmd.gate, reservation_id, txn.now,
            txn.now if confirmed_now else None, entry_factor(txn, lot),
        ),
    )  # fmt: skip
    txn.emit(
        SessionStarted(
            session_id=session_id,
            lot=lot,
            zone=zone,
            slot=slot_id,
            vehicle=vehicle,
            gate=cmd.gate,
            reservation_id=reservation_id,
        )
    )
    if confirmed_now:
        txn.emit(SessionConfirmed(session_id=session_id, gate=cmd.gate))
        reconcile.session_confirmed(txn, session_id)
    if reservation_id is not None:
        reservations.arrived(txn, reservation_id, session_id)
    slots.refresh(txn, slot_id, "session.started")
    return {"session_id": session_id, "slot": slot_id, "zone": zone}
