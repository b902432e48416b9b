"""Reservations (contract §6): a slot held for [start, end), converted into a session when its vehicle arrives.

States: `booked` (a slot is assigned; its hold has not begun) -> `held` (from `hold_from` the slot's status is
`reserved`) -> `arrived` (the vehicle entered: a session with its reservation_id), or `cancelled`, or `no_show`
(nobody came by `start + no_show_after`, or by `end` when that is sooner). `booked` and `held` are live; only
live reservations count for allocation and overlap.

Overlap is judged on [start, end): the live reservations of one slot are disjoint, so ordered by `end_at` they are
ordered by `start_at` too, and "is this slot free for [s, e)?" is one probe of `reservations_live_slot`: the first
live reservation ending after `s` overlaps iff it starts before `e`. A slot's hold for a reservation begins at the
later of `start - hold_ahead` and the end of that slot's previous live reservation; it is recomputed whenever the
slot's previous reservation changes.

Appointments are wall-clock deadlines (gateway/core/timers.py, `base="wall"`): `reservation.hold` at `hold_from`,
`reservation.release` at `min(end, start + no_show_after)`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

from gateway.core import slots, timers
from gateway.core.clock import iso_ms
from gateway.core.domain import CancelReservation, CommandError, Reserve
from gateway.core.events import (
    ReservationArrived,
    ReservationCancelled,
    ReservationCreated,
    ReservationMoved,
    ReservationNoShow,
)
from gateway.core.plates import PlateError, normalise
from gateway.core.txn import Txn

HOLD = "reservation.hold"
RELEASE = "reservation.release"
LIVE = "state IN ('booked', 'held')"

# A slot of (lot, type, status), in allocation order within an alloc_rank range, free of every live reservation
# overlapping [s, e): the scalar subquery is one seek of reservations_live_slot per candidate slot.
_CANDIDATES = (
    " FROM slots INDEXED BY slots_alloc_type"
    " WHERE lot = :lot AND type = :type AND status = :status AND alloc_rank >= :lo AND alloc_rank < :hi"
    " AND id != :own{zone}"
)
_FREE = (
    " AND COALESCE((SELECT r.start_at FROM reservations r WHERE r.slot = slots.id AND r." + LIVE + ""
    " AND r.end_at > :s ORDER BY r.end_at LIMIT 1), :e) >= :e"
)
_ORDER = " ORDER BY alloc_rank, fill_order"
_FREE_ANY_ZONE = "SELECT id, zone" + _CANDIDATES.format(zone="") + _FREE + _ORDER + " LIMIT 1"
_FREE_IN_ZONE = "SELECT id, zone" + _CANDIDATES.format(zone=" AND zone = :zone") + _FREE + _ORDER + " LIMIT 1"
_FIRST_ANY_ZONE = "SELECT id, zone" + _CANDIDATES.format(zone="") + _ORDER + " LIMIT :n"
_FIRST_IN_ZONE = "SELECT id, zone" + _CANDIDATES.format(zone=" AND zone = :zone") + _ORDER + " LIMIT :n"
_SLOT_FREE = (
    "SELECT COALESCE((SELECT start_at FROM reservations WHERE slot = :slot AND " + LIVE + ""
    " AND end_at > :s ORDER BY end_at LIMIT 1), :e) >= :e"
)
# Packing looks at this many slots that already have reservations before taking a clean one: bounded, so a
# lot where every booked slot is taken for the requested time (everyone books the same evening) costs
# PACK seeks per reservation before the clean slot, not one per booked slot.
PACK = 32


ReservationEvent = (
    type[ReservationCreated]
    | type[ReservationMoved]
    | type[ReservationCancelled]
    | type[ReservationArrived]
    | type[ReservationNoShow]
)


def _event(cls: ReservationEvent, txn: Txn, row: sqlite3.Row | dict[str, Any], slot: str | None = None) -> None:
    txn.emit(
        cls(
            reservation_id=row["id"],
            lot=row["lot"],
            slot=row["slot"] if slot is None else slot,
            vehicle=txn.vehicle_ref(row["plate"] or row["vehicle"], row["vehicle"]),
            start=iso_ms(row["start_at"]),
            end=iso_ms(row["end_at"]),
        )
    )


def find_slot(
    txn: Txn,
    lot: str,
    zone: str | None,
    types: list[str],
    start: float,
    end: float,
    *,
    now_only: bool,
    own: str = "",
) -> tuple[str, str, str] | None:
    """(slot, zone, type) free of every live reservation overlapping [start, end), or None.

    `now_only`: the hold begins now, so only a slot that is `available` right now will do; otherwise a slot held
    or occupied now may serve a later reservation. Slots that already have a reservation come first within each
    status, so reservations pack and walk-ins keep slots with none ahead. Blocked slots are never taken.
    """
    statuses = ("available",) if now_only else ("available", "reserved", "occupied")
    ahead = slots.RESERVED_AHEAD
    free, first = (_FREE_ANY_ZONE, _FIRST_ANY_ZONE) if zone is None else (_FREE_IN_ZONE, _FIRST_IN_ZONE)
    for type_ in types:
        for status in statuses:
            args = {"lot": lot, "type": type_, "status": status, "own": own, "zone": zone, "s": start, "e": end}
            # The first PACK slots with reservations, then clean slots, then every slot with reservations.
            for slot, slot_zone in txn.conn.execute(first, {**args, "lo": ahead, "hi": 2 * ahead, "n": PACK}):
                if txn.conn.execute(_SLOT_FREE, {"slot": slot, "s": start, "e": end}).fetchone()[0]:
                    return str(slot), str(slot_zone), type_
            for lo, hi in ((0, ahead), (ahead, 2 * ahead)):
                row = txn.conn.execute(free, {**args, "lo": lo, "hi": hi}).fetchone()
                if row is not None:
                    return str(row[0]), str(row[1]), type_
    return None


def _hold_from(txn: Txn, slot: str, start: float, rid: str) -> float:
    prev = txn.conn.execute(
        f"SELECT MAX(end_at) FROM reservations WHERE slot = ? AND {LIVE} AND end_at <= ? AND id != ?",
        (slot, start, rid),
    ).fetchone()[0]
    hold = start - txn.settings.hold_ahead
    return hold if prev is None else max(hold, float(prev))


def release_at(start: float, end: float, no_show_after: float) -> float:
    """When a reservation nobody came for is released."""
    return min(end, start + no_show_after)


def reserve(txn: Txn, cmd: Reserve) -> dict[str, Any]:
    if cmd.lot not in txn.settings.lots:
        raise CommandError("unknown_lot", f"no lot {cmd.lot!r}")
    if cmd.zone is not None and cmd.zone not in txn.settings.zones.get(cmd.lot, frozenset()):
        raise CommandError("invalid_request", f"lot {cmd.lot!r} has no zone {cmd.zone!r}")
    try:
        plate = normalise(cmd.vehicle)
    except PlateError as exc:
        raise CommandError("invalid_request", f"vehicle: {exc}") from None
    if not (math.isfinite(cmd.start) and math.isfinite(cmd.end)):
        raise CommandError("invalid_request", "start and end must be times")
    request = {"vehicle": plate, "lot": cmd.lot, "type": cmd.type, "zone": cmd.zone, "start": cmd.start, "end": cmd.end}
    known = txn.conn.execute("SELECT request, reply FROM reservations WHERE id = ?", (cmd.reservation_id,)).fetchone()
    if known is not None:
        if json.loads(known["request"]) != request:
            raise CommandError("conflict", f"reservation {cmd.reservation_id!r} exists with other fields")
        first: dict[str, Any] = json.loads(known["reply"])
        return first
    if cmd.end <= cmd.start:
        raise CommandError("invalid_request", "end must be after start")
    if cmd.end <= txn.now:
        raise CommandError("invalid_request", "end must be in the future")
    from gateway.core.allocation import candidate_types  # allocation imports this module for arrivals

    types = candidate_types(txn, cmd.lot, plate, cmd.type)
    now_only = cmd.start - txn.settings.hold_ahead <= txn.now
    picked = find_slot(txn, cmd.lot, cmd.zone, types, cmd.start, cmd.end, now_only=now_only)
    if picked is None:
        raise CommandError("full", "no slot of that kind is free for that time")
    slot, _zone, type_ = picked
    hold_from = _hold_from(txn, slot, cmd.start, cmd.reservation_id)
    reply = {"reservation_id": cmd.reservation_id, "slot": slot}
    row = {
        "id": cmd.reservation_id,
        "lot": cmd.lot,
        "slot": slot,
        "plate": plate,
        "vehicle": txn.key.token(plate),
        "start_at": cmd.start,
        "end_at": cmd.end,
    }
    txn.conn.execute(
        "INSERT INTO reservations (id, lot, zone, type, slot, plate, vehicle, start_at, end_at, hold_from, state,"
        " created_at, request, reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'booked', ?, ?, ?)",
        (
            cmd.reservation_id, cmd.lot, cmd.zone, type_, slot, plate, row["vehicle"], cmd.start, cmd.end,
            hold_from, txn.now, json.dumps(request), json.dumps(reply),
        ),
    )  # fmt: skip
    _event(ReservationCreated, txn, row)
    release = release_at(cmd.start, cmd.end, txn.settings.no_show_after)
    timers.schedule(txn, RELEASE, cmd.reservation_id, release, base="wall")
    _hold_or_schedule(txn, cmd.reservation_id, hold_from)
    _rehold_next(txn, slot, cmd.end)
    return reply


def _hold_or_schedule(txn: Txn, rid: str, hold_from: float) -> None:
    if hold_from <= txn.now:
        timers.cancel(txn, HOLD, rid)
        begin_hold(txn, rid)
    else:
        timers.schedule(txn, HOLD, rid, hold_from, base="wall")
        row = txn.conn.execute("SELECT slot FROM reservations WHERE id = ?", (rid,)).fetchone()
        slots.refresh(txn, row["slot"], "reservation.booked")  # a reservation ahead: walk-ins go elsewhere first


def _rehold_next(txn: Txn, slot: str, after: float) -> None:
    """The slot's previous reservation changed for the one after `after`: its hold may begin sooner or later."""
    nxt = txn.conn.execute(
        f"SELECT id, start_at, hold_from, state FROM reservations WHERE slot = ? AND {LIVE} AND end_at > ?"
        " ORDER BY end_at LIMIT 1",
        (slot, after),
    ).fetchone()
    if nxt is None or nxt["state"] != "booked":
        return
    hold = _hold_from(txn, slot, nxt["start_at"], nxt["id"])
    if hold != nxt["hold_from"]:
        txn.conn.execute("UPDATE reservations SET hold_from = ? WHERE id = ?", (hold, nxt["id"]))
    if hold <= txn.now:
        timers.cancel(txn, HOLD, nxt["id"])
        begin_hold(txn, nxt["id"])
    elif hold != nxt["hold_from"]:
        timers.schedule(txn, HOLD, nxt["id"], hold, base="wall")


def _in_use(txn: Txn, slot: str, rid: str) -> bool:
    """A car is in the slot, it is blocked, or another reservation holds it."""
    row = txn.conn.execute("SELECT sensor_state, blocked FROM slots WHERE id = ?", (slot,)).fetchone()
    if row is None or row["sensor_state"] == "occupied" or row["blocked"]:
        return True
    if slots.active_session_on(txn.conn, slot) is not None:
        return True
    other = txn.conn.execute(
        "SELECT 1 FROM reservations WHERE slot = ? AND state = 'held' AND id != ?", (slot, rid)
    ).fetchone()
    return other is not None


def _move(txn: Txn, res: sqlite3.Row) -> str | None:
    """Move a live reservation off its slot to a free one of its kind (type; zone if it asked for one)."""
    picked = find_slot(
        txn, res["lot"], res["zone"], [res["type"]], res["start_at"], res["end_at"], now_only=True, own=res["slot"]
    )
    if picked is None:
        return None
    old, new = res["slot"], picked[0]
    txn.conn.execute("UPDATE reservations SET slot = ?, hold_from = ? WHERE id = ?", (new, txn.now, res["id"]))
    _event(ReservationMoved, txn, res, slot=new)
    slots.refresh(txn, old, "reservation.moved")
    _rehold_next(txn, old, res["end_at"])
    _rehold_next(txn, new, res["end_at"])
    return new


@timers.on_due(HOLD)
def _hold_due(txn: Txn, rid: str) -> None:
    begin_hold(txn, rid)


def begin_hold(txn: Txn, rid: str) -> None:
    """From now the slot is `reserved`; a walk-in still in it moves the reservation, or it is at risk."""
    res = txn.conn.execute("SELECT * FROM reservations WHERE id = ? AND state = 'booked'", (rid,)).fetchone()
    if res is None:
        return
    slot = res["slot"]
    if _in_use(txn, slot, rid):
        moved = _move(txn, res)
        if moved is None:
            txn.alert(
                "reservation.at_risk",
                "warning",
                {"reservation": rid, "slot": slot},
                f"slot {slot} is in use as the hold of reservation {rid} begins and no other slot of its kind is free",
            )
        else:
            slot = moved
    txn.conn.execute("UPDATE reservations SET state = 'held' WHERE id = ?", (rid,))
    slots.refresh(txn, slot, "reservation.held")


def _close(txn: Txn, res: sqlite3.Row, state: str, session_id: str | None = None) -> None:
    txn.conn.execute(
        "UPDATE reservations SET state = ?, closed_at = ?, session_id = ? WHERE id = ?",
        (state, txn.now, session_id, res["id"]),
    )
    timers.cancel(txn, HOLD, res["id"])
    timers.cancel(txn, RELEASE, res["id"])
    slots.refresh(txn, res["slot"], f"reservation.{state}")
    _rehold_next(txn, res["slot"], res["end_at"])


@timers.on_due(RELEASE)
def _release_due(txn: Txn, rid: str) -> None:
    res = txn.conn.execute(f"SELECT * FROM reservations WHERE id = ? AND {LIVE}", (rid,)).fetchone()
    if res is not None:
        _event(ReservationNoShow, txn, res)
        _close(txn, res, "no_show")


def cancel(txn: Txn, cmd: CancelReservation) -> dict[str, Any]:
    res = txn.conn.execute("SELECT * FROM reservations WHERE id = ?", (cmd.reservation_id,)).fetchone()
    if res is None:
        raise CommandError("invalid_request", f"no reservation {cmd.reservation_id!r}")
    if res["state"] == "cancelled":
        return {}
    if res["state"] not in ("booked", "held"):
        raise CommandError("conflict", f"reservation {cmd.reservation_id!r} is {res['state'].replace('_', ' ')}")
    _event(ReservationCancelled, txn, res)
    _close(txn, res, "cancelled")
    return {}


def arriving(txn: Txn, lot: str, token: str) -> sqlite3.Row | None:
    """The vehicle's live reservation in this lot whose arrival window holds now, earliest first."""
    s = txn.settings
    for res in txn.conn.execute(
        f"SELECT * FROM reservations WHERE lot = ? AND vehicle = ? AND {LIVE} AND start_at <= ? ORDER BY start_at",
        (lot, token, txn.now + s.hold_ahead),
    ):
        # Until the release: a release deadline that has not fired yet does not turn the vehicle away.
        if txn.now <= release_at(res["start_at"], res["end_at"], s.no_show_after):
            found: sqlite3.Row = res
            return found
    return None


def claim(txn: Txn, res: sqlite3.Row) -> tuple[str, str] | None:
    """The (slot, zone) the arriving vehicle gets: its reserved one, or another of its kind when that is in use."""
    slot = res["slot"]
    if _in_use(txn, slot, res["id"]):
        moved = _move(txn, res)
        if moved is None:
            return None
        slot = moved
    zone = txn.conn.execute("SELECT zone FROM slots WHERE id = ?", (slot,)).fetchone()[0]
    return slot, str(zone)


def arrived(txn: Txn, rid: str, session_id: str) -> None:
    """The session has started: the reservation is done and its slot (if the car is elsewhere) freed."""
    res = txn.conn.execute("SELECT * FROM reservations WHERE id = ?", (rid,)).fetchone()
    _close(txn, res, "arrived", session_id)


def announce_arrival(txn: Txn, rid: str, slot: str) -> None:
    """`reservation.arrived` with the slot the vehicle gets (before its session.started)."""
    res = txn.conn.execute("SELECT * FROM reservations WHERE id = ?", (rid,)).fetchone()
    _event(ReservationArrived, txn, res, slot=slot)
