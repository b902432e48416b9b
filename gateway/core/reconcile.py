"""Sensors and sessions (contract §6): sessions are the truth, sensors are evidence.

Every rule here runs inside the writer's transaction, as the handler of a command or of a deadline, so a
decision and its events commit together. Durations are on the writer's Timeline (`txn.timer_now`): a wall-clock
step changes no outcome.

- **Occupied** on a slot with a session: the car is in its slot (`seated_at`); a vacate countdown is cancelled.
  Unless the session is unseated and passed the gate less than `GATE_TO_SLOT` before the car was first seen (or has
  not yet): that car is someone else's, and the session runs on without a slot (`taken`), the slot then as free.
  On a free slot (no active session, blocked or not): the slot leaves availability, and the nearest unseated
  session of the lot is re-seated there (`session.moved`, its old slot freed) — one confirmed `GATE_TO_SLOT` or
  more before the car was first seen and less than `arrival_window` ago, or one roaming without a slot or placed
  `unseen`; those on their way for less than `drive_time` (with a slot or without) first (of several zones, the
  likeliest zone: `_likeliest`), then same zone, then one whose slot's sensor would have seen it arrive, then the
  oldest; last of all one whose own slot's sensor is debouncing a car (the ingress's `SensorChanges.arriving`, or a
  later change of the same batch): its car has most likely just parked there.
  With none on its way for less than `drive_time`, a seated session whose slot has been vacant for that long comes
  first: its car moved on (no exit), or a chain of such picks seated it on another's.
  Without one: `alert` `slot.unregistered_occupancy`. The same when a session ends while its slot still reports a
  car, where a seated session whose own slot reports vacant and that was confirmed within `drive_time` of the
  ended one comes first: the nearest-candidate rule can seat two cars' sessions crosswise (both on their way at
  once), and when one of them leaves this is where the other swaps back; then one whose slot has been vacant for
  `drive_time` or more (its car is in the lot but not there, and it is no car on its way to the exit any more);
  any other session with a vacant slot is most likely a car on its way to the exit. Unless that sensor has not
  been heard within half its `offline_after`:
  the car it last saw has most likely just left without a word from it, so it is offline at once.
- **A pick across zones is looked at again** when a session of another zone it passed over has been on its way
  for `drive_time` unseen (`session.recheck`, `_recheck`): the car is then more likely that one's if it is
  older, and may be if it is younger (whichever car is likelier to stand where no sensor sees it is the other).
- **Re-seats can be taken back.** The slot a session on its way was re-seated away from is remembered for its
  arrival window (`session.reseated`) and allocated last in its tier. A car found there soon enough is that
  session's after all: it goes back, and the car it had been re-seated to is matched again. A re-seat whose car
  is gone within `reseat_settle` of its first sighting is undone (`reverted`).
- **Vacant** on a confirmed session's slot (and from `session.confirmed` while the slot's sensor says vacant):
  a `session.vacate` deadline `vacate_grace` later. When it comes, and the sensor has been heard since the
  vacancy began and within half its `offline_after` (its last word alone is no evidence for the whole grace: a
  sensor that died reporting vacant, or died before the car came, must not release the car parked over it
  before it is known offline): `alert` `session.vacated`, the session runs on without a slot (`session.moved` to
  null) back in the zone it was given at entry (`home_zone`), the slot is available again; it is then seated in a
  free slot whose sensor is offline, if any (`unseen`: its car is in no watched slot), or in the next one that
  appears (`_went_dark`: going offline, or left by its session; a guess in another zone moves to one of its own
  zone there). That guess stays a candidate
  for a car found without a session (`unseen_at`).
  Otherwise it looks again `vacate_recheck` later, until the sensor speaks or goes offline.
- **Offline**: no message for the slot group's `offline_after` (else `sensor_offline_after`), or for half of it when
  a session ends while the sensor still says occupied (its car has left without a word from it). The ingress fires it
  from memory, exactly; a `sensor.offline` deadline in the store, kept at most `offline_pad` past the memory's,
  fires it after a crash. Offline cancels a vacate countdown (no evidence, so the session stands); the slot stays
  allocatable, last (`alloc_rank`). A sensor heard again is back (`alert` `sensor.online`).
- **Battery** below its threshold: `alert` `sensor.battery_low`, at most once per `BATTERY_REPEAT_S` per sensor,
  again once it recovered (a reading of at least threshold + `BATTERY_HYSTERESIS`).

Invariants (checked by `gateway/store/audit.py`): a `session.vacate` row exists exactly for the active,
confirmed sessions with a slot whose sensor says vacant; a `sensor.offline` row exactly for the sensors that
say vacant or occupied. Lanes that confirm a session later call `session_confirmed`; whatever ends or cancels
a session calls `session_closed`.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Literal

from gateway.core import slots, timers
from gateway.core.clock import iso_ms
from gateway.core.domain import BatteryReport, Rearm, SensorChange, SensorChanges, SensorsSeen
from gateway.core.events import SessionMoved
from gateway.core.txn import Txn

VACATE = "session.vacate"
OFFLINE = "sensor.offline"
RESEATED = "session.reseated"
RECHECK = "session.recheck"
BATTERY_REPEAT_S = 86400.0
BATTERY_HYSTERESIS = 0.1
LIVE_STATES = ("vacant", "occupied")
# Of drivers parking elsewhere than assigned, the share that stays in the assigned zone when it has room.
SAME_ZONE_SHARE = 0.7
# No car parks within this long of passing the gate: a car first seen in a session's slot sooner (or before the
# session passed at all) is someone else's; its report came in behind the camera read, which went first.
GATE_TO_SLOT = 2.0


def offline_pad(flush: float) -> float:
    """How far past the memory's deadline a stored offline deadline is written."""
    return 5 * flush


def offline_slack(flush: float) -> float:
    """A stored offline deadline is rewritten once the memory's comes within this of it."""
    return 2 * flush


def battery_verdict(
    volts: float, threshold: float, *, low: bool, alerted_at: float | None, now: float
) -> Literal["low", "ok"] | None:
    """What a reading says beyond what is known: "low" (alert due), "ok" (recovered) or None (nothing new)."""
    if volts < threshold:
        if not low or alerted_at is None or now - alerted_at >= BATTERY_REPEAT_S:
            return "low"
        return None
    if low and volts >= threshold + BATTERY_HYSTERESIS:
        return "ok"
    return None


def _timer_at(txn: Txn, wall_at: float) -> float:
    """A recorded wall time as Timeline time (they differ by a constant within one commit)."""
    return txn.timer_now - max(0.0, txn.now - wall_at)


def _wall_at(txn: Txn, timer_at: float) -> float:
    return txn.now - (txn.timer_now - timer_at)


def _offline_after(txn: Txn, slot: sqlite3.Row) -> float:
    after = slot["offline_after"]
    return float(after) if after is not None else txn.settings.sensor_offline_after


def sensor_changes(txn: Txn, cmd: SensorChanges) -> dict[str, Any]:
    # Cars just parked: still debounced by the ingress, or further on in this batch.
    arriving = cmd.arriving | {c.sensor for c in cmd.changes if c.state == "occupied"}
    changed = [slot for change in cmd.changes if (slot := _sensor_change(txn, change, arriving)) is not None]
    return {"changed": changed}


def _sensor_change(txn: Txn, cmd: SensorChange, arriving: frozenset[str] = frozenset()) -> str | None:
    """Apply one transition; the slot id when it changed something, None for a no-op or an unknown sensor."""
    slot = txn.conn.execute("SELECT * FROM slots WHERE sensor = ?", (cmd.sensor,)).fetchone()
    if slot is None or slot["sensor_state"] == cmd.state:
        return None
    slot_id: str = slot["id"]
    was = slot["sensor_state"]
    txn.conn.execute("UPDATE slots SET sensor_state = ? WHERE id = ?", (cmd.state, slot_id))
    session = txn.conn.execute(
        "SELECT id, confirmed_timer, seated_at, reseated_from, reseated_seen FROM sessions"
        " WHERE slot = ? AND state = 'active'",
        (slot_id,),
    ).fetchone()
    if cmd.state == "offline":
        timers.cancel(txn, OFFLINE, cmd.sensor)
        if session is not None:
            timers.cancel(txn, VACATE, session["id"])
        txn.alert(
            "sensor.offline",
            "warning",
            {"slot": slot_id, "sensor": cmd.sensor},
            f"no message from sensor {cmd.sensor} since {iso_ms(cmd.at)}",
        )
    else:
        if was == "offline":
            txn.alert("sensor.online", "info", {"slot": slot_id, "sensor": cmd.sensor}, "sensor reports again")
        txn.conn.execute(
            "UPDATE slots SET seen_timer = MAX(COALESCE(seen_timer, ?1), ?1) WHERE id = ?2",
            (_timer_at(txn, cmd.at), slot_id),
        )
        if timers.due_at(txn, OFFLINE, cmd.sensor) is None:
            # The ingress keeps the exact deadline in memory; this one only has to lie beyond it.
            due = txn.timer_now + _offline_after(txn, slot) + txn.settings.offline_pad
            timers.schedule(txn, OFFLINE, cmd.sensor, due)
        if cmd.state == "occupied":
            _occupied(txn, slot, session, _timer_at(txn, cmd.at), arriving=arriving)
        elif session is not None and session["confirmed_timer"] is not None:
            if not _take_back(txn, slot, session, cmd.at):
                _start_vacancy(txn, session["id"], _timer_at(txn, cmd.at))
    slots.refresh(txn, slot_id, f"sensor.{cmd.state}", sensor_moved=True)
    if cmd.state == "offline" and session is None:
        _went_dark(txn, slot_id)
    return slot_id


def _occupied(
    txn: Txn,
    slot: sqlite3.Row,
    session: sqlite3.Row | None,
    seen: float,
    *,
    swap: float | None = None,
    arriving: frozenset[str] = frozenset(),
) -> None:
    """A car in the slot, first seen at `seen` (Timeline): seat its session, or find the one it belongs to.
    `swap`: the slot's session has just ended and had been confirmed then (Timeline; None: never); `arriving`:
    sensors known to see a car that the store does not have yet (`SensorChanges.arriving`)."""
    slot_id: str = slot["id"]
    if session is not None:
        if session["seated_at"] is not None or not _too_soon(session, seen):
            timers.cancel(txn, VACATE, session["id"])
            if session["seated_at"] is None:
                txn.conn.execute(
                    "UPDATE sessions SET seated_at = ?, unseen_at = NULL WHERE id = ?", (txn.now, session["id"])
                )
            return
        _taken(txn, session["id"], slot_id)  # and the car is matched as on a free slot
    # The session re-seated away from here, if this could be its car arriving (on its way for less than
    # drive_time): the pick was wrong. A car found here later is someone else's.
    returning = txn.conn.execute(
        "SELECT id, slot, reseated_seen FROM sessions INDEXED BY sessions_reseated_from"
        " WHERE reseated_from = ? AND state = 'active' AND confirmed_timer >= ?",
        (slot_id, seen - txn.settings.drive_time),
    ).fetchone()
    if returning is not None and _returns(txn, slot, returning, seen, arriving):
        _return(txn, slot, returning, seen, arriving)
        return
    candidate = None if swap is None else _crossed(txn, slot, swap)
    recheck = None
    if candidate is None:
        candidate, recheck = _pick(txn, slot, seen, arriving)
    if candidate is None:
        _unregistered(txn, slot_id, seen)
        return
    # A seated session moving here left a vacant slot; one on its way leaves one its car may still drive to.
    _reseat(txn, candidate["id"], slot, candidate["slot"], seen, remember=not candidate["seated"])
    if recheck is not None:
        timers.schedule(txn, RECHECK, candidate["id"], recheck)


def _too_soon(session: sqlite3.Row, seen: float) -> bool:
    """Whether a car first seen at `seen` is too early to be the session's: it had not passed the gate
    `GATE_TO_SLOT` before (a car parking as another passes the gate, whose read went ahead of the sensor's)."""
    confirmed = session["confirmed_timer"]
    return confirmed is None or confirmed > seen - GATE_TO_SLOT


def _taken(txn: Txn, session_id: str, slot_id: str) -> None:
    """The session's slot was taken by another car before its own could get there: it runs on without a slot,
    its car to be matched wherever it parks (`_pick`)."""
    timers.cancel(txn, VACATE, session_id)
    txn.conn.execute(
        "UPDATE sessions SET slot = NULL, vacant_since = NULL, unseen_at = NULL WHERE id = ?", (session_id,)
    )
    txn.emit(SessionMoved(session_id=session_id, from_slot=slot_id, to_slot=None, reason="taken"))


def _reseat(
    txn: Txn, session_id: str, slot: sqlite3.Row, from_slot: str | None, seen: float, *, remember: bool
) -> None:
    """Seat the session on the car in `slot`, its `from_slot` freed; `remember`: its car may still be driving to
    `from_slot` (`_set_reseated_from`). The caller refreshes `slot`."""
    txn.conn.execute(
        "UPDATE sessions SET slot = ?, zone = ?, seated_at = ?, vacant_since = NULL, unseen_at = NULL WHERE id = ?",
        (slot["id"], slot["zone"], txn.now, session_id),
    )
    timers.cancel(txn, VACATE, session_id)
    _set_reseated_from(txn, session_id, from_slot if remember else None, seen)
    txn.emit(SessionMoved(session_id=session_id, from_slot=from_slot, to_slot=slot["id"], reason="reseated"))
    if from_slot is not None:
        slots.refresh(txn, from_slot, "session.moved")
        _went_dark(txn, from_slot)  # an unseen guess taken for a car elsewhere leaves a dark slot


def _unregistered(txn: Txn, slot_id: str, seen: float) -> None:
    txn.alert(
        "slot.unregistered_occupancy",
        "warning",
        {"slot": slot_id},
        f"slot {slot_id} reports a vehicle without a session since {iso_ms(_wall_at(txn, seen))}",
    )


def _heard_lately(txn: Txn, slot: sqlite3.Row) -> bool:
    """Whether the slot's sensor was heard within half its offline_after: well above how far the stored
    seen_timer lags a live sensor (about 4 x sensor_seen_flush plus its heartbeat), so what it said last is still
    evidence; a sensor silent that long may have died with a car over it that has left since."""
    seen = slot["seen_timer"]
    return seen is not None and seen >= txn.timer_now - _offline_after(txn, slot) / 2


def _on_its_way(txn: Txn, slot: sqlite3.Row, seen: float, arriving: frozenset[str] = frozenset()) -> sqlite3.Row | None:
    """The session on its way that a car first seen in `slot` at `seen` most likely belongs to, or None."""
    return _pick(txn, slot, seen, arriving)[0]


def _pick(
    txn: Txn, slot: sqlite3.Row, seen: float, arriving: frozenset[str] = frozenset()
) -> tuple[sqlite3.Row | None, float | None]:
    """`_on_its_way`, and when the pick passed over a session of another zone, when the first such one's
    drive_time ends (Timeline): if its car has not arrived by then, the car may be its (`_recheck`).

    Last of all, one whose own slot's sensor is `arriving`: its car has most likely just parked there.
    With none on its way for less than `drive_time`, one seated whose slot has been vacant that long comes
    first (`_left_long`)."""
    # On its way when the car was first seen (not when the debounce let it count): confirmed before then, and no
    # longer ago than arrival_window (unless it has no slot). A handful of rows: the sessions on their way.
    candidates: list[sqlite3.Row] = txn.conn.execute(
        "SELECT s.id, s.slot, s.zone, s.confirmed_timer, t.sensor, 0 AS seated FROM sessions s"
        " INDEXED BY sessions_unseated"
        " LEFT JOIN slots t ON t.id = s.slot"
        " WHERE s.lot = ? AND s.state = 'active' AND s.seated_at IS NULL AND s.confirmed_timer <= ?"
        " AND (s.slot IS NULL OR s.unseen_at IS NOT NULL OR s.confirmed_timer >= ?)"
        # Plausible first: on its way for less than drive_time (with a slot or, `_taken`, without). Then same
        # zone; then one whose own slot's sensor would have seen it arrive; then the oldest.
        " ORDER BY s.confirmed_timer < ?, s.zone IS NOT ?, t.sensor_state IS NOT 'vacant',"
        " s.confirmed_timer, s.started_at, s.id",
        (
            slot["lot"],
            seen - GATE_TO_SLOT,
            seen - txn.settings.arrival_window,
            seen - txn.settings.drive_time,
            slot["zone"],
        ),
    ).fetchall()
    plausible = [
        c for c in candidates if c["confirmed_timer"] >= seen - txn.settings.drive_time and c["sensor"] not in arriving
    ]
    if not plausible and (left := _left_long(txn, slot, seen)) is not None:
        return left, None
    if not candidates:
        return None, None
    if len({c["zone"] for c in plausible}) > 1:
        chosen = _likeliest(txn, slot, seen, plausible)
        passed = [c["confirmed_timer"] for c in plausible if c["zone"] != chosen["zone"]]
        return chosen, (min(passed) + txn.settings.drive_time if passed else None)
    return next((c for c in candidates if c["sensor"] not in arriving), candidates[0]), None


def _likeliest(txn: Txn, slot: sqlite3.Row, seen: float, plausible: list[sqlite3.Row]) -> sqlite3.Row:
    """Of sessions on their way to several zones, one of the zone the car in `slot` most likely came from.

    Only the zone moves the published counts, so the zones are weighed, each by the sum over its sessions of
    how likely that session's car is this one: a driver parking elsewhere than assigned stays in the assigned
    zone (`SAME_ZONE_SHARE`) when it has room, otherwise takes any free slot of the lot; and with drive times
    spread up to `drive_time`, a car on its way for longer is likelier to arrive now (the hazard
    1 / (drive_time - time on its way)). Within the zone, the first in `_on_its_way`'s order."""
    free, _ = _free_by_zone(txn, slot["lot"])
    lot_free = sum(free.values())
    weights: dict[str, float] = {}
    for c in plausible:
        share = _zone_share(free, lot_free, slot["zone"], c["zone"])
        hazard = 1.0 / max(1.0, txn.settings.drive_time - (seen - c["confirmed_timer"]))
        weights[c["zone"]] = weights.get(c["zone"], 0.0) + share * hazard
    zone = max(weights, key=lambda z: weights[z])
    return next(c for c in plausible if c["zone"] == zone)


def _free_by_zone(txn: Txn, lot: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per zone of the lot: its free slots, and of them those no sensor watches (offline or none)."""
    free: dict[str, int] = {}
    dark: dict[str, int] = {}
    for zone, n, unwatched in txn.conn.execute(
        "SELECT zone, COUNT(*), SUM(sensor_state IN ('offline', 'none')) FROM slots"
        " WHERE lot = ? AND status = 'available' GROUP BY zone",
        (lot,),
    ):
        free[zone], dark[zone] = n, unwatched
    return free, dark


def _zone_share(free: dict[str, int], lot_free: int, here: str, zone: str) -> float:
    """How likely a driver sent to `zone` who parks elsewhere picks a given free slot of zone `here`, times the
    lot's free slots: one who stays in the assigned zone when it has room (`SAME_ZONE_SHARE`), or any free slot."""
    if zone == here:
        return SAME_ZONE_SHARE * max(1, lot_free) / max(1, free.get(here, 0)) + (1 - SAME_ZONE_SHARE)
    return 1 - SAME_ZONE_SHARE if free.get(zone, 0) else 1.0


def _unseen_share(free: dict[str, int], dark: dict[str, int], zone: str) -> float:
    """How likely a driver sent to `zone` who parks elsewhere stands where no sensor sees it: of the free slots
    the driver chooses among as in `_zone_share`, the share that are dark."""
    anywhere = sum(dark.values()) / max(1, sum(free.values()))
    if not free.get(zone, 0):
        return anywhere
    return SAME_ZONE_SHARE * dark.get(zone, 0) / free[zone] + (1 - SAME_ZONE_SHARE) * anywhere


def _returns(txn: Txn, slot: sqlite3.Row, row: sqlite3.Row, seen: float, arriving: frozenset[str]) -> bool:
    """Whether the car in `slot` is taken for the returning session's (`row`) rather than for one on its way.

    Yes, unless the slot it was re-seated to would be left with a car nobody is on the way for while this car
    has a candidate: then that re-seat was probably right, and this is a mispark into the freed slot."""
    if row["slot"] is None:
        return True
    was = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (row["slot"],)).fetchone()
    if was["sensor_state"] != "occupied":
        return True
    return (
        _on_its_way(txn, was, row["reseated_seen"], arriving) is not None
        or _on_its_way(txn, slot, seen, arriving) is None
    )


def _set_reseated_from(txn: Txn, session_id: str, from_slot: str | None, seen: float | None = None) -> None:
    """Remember the slot a session on its way was re-seated away from, until its arrival window ends, and when the
    car it was re-seated to was first seen (None: forget them). That slot is allocated last in its tier meanwhile
    (`slots.DISPLACED`): if the pick was wrong, its car is still driving there, and handing it to the next car
    would start a chain of forced misparks."""
    row = txn.conn.execute("SELECT reseated_from, confirmed_timer FROM sessions WHERE id = ?", (session_id,)).fetchone()
    confirmed = row["confirmed_timer"]
    until = None if from_slot is None or confirmed is None else confirmed + txn.settings.arrival_window
    if until is None or until <= txn.timer_now:
        from_slot = None
        timers.cancel(txn, RESEATED, session_id)
        timers.cancel(txn, RECHECK, session_id)
    else:
        timers.schedule(txn, RESEATED, session_id, until)
    txn.conn.execute(
        "UPDATE sessions SET reseated_from = ?, reseated_seen = ? WHERE id = ?",
        (from_slot, None if from_slot is None else seen, session_id),
    )
    if row["reseated_from"] is not None and row["reseated_from"] != from_slot:
        slots.refresh(txn, row["reseated_from"], "session.moved")


def _return(txn: Txn, slot: sqlite3.Row, row: sqlite3.Row, seen: float, arriving: frozenset[str]) -> None:
    """A car in the slot a session on its way was re-seated away from: its car came after all. The session goes
    back; the slot it was re-seated to, if it still reports a car, holds someone else's and is matched again.
    If nobody's (no candidate), the session remembers it: should this car vanish within `reseat_settle` (a flap
    stretched past the debounce), the session is taken back there."""
    session_id, was = row["id"], row["slot"]
    txn.conn.execute(
        "UPDATE sessions SET slot = ?, zone = ?, seated_at = ?, vacant_since = NULL, unseen_at = NULL WHERE id = ?",
        (slot["id"], slot["zone"], txn.now, session_id),
    )
    timers.cancel(txn, VACATE, session_id)
    _set_reseated_from(txn, session_id, None)
    txn.emit(SessionMoved(session_id=session_id, from_slot=was, to_slot=slot["id"], reason="reseated"))
    if was is None:
        return
    other = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (was,)).fetchone()
    if other["sensor_state"] == "occupied":
        _occupied(txn, other, None, row["reseated_seen"], arriving=arriving)  # judged as when that car was first seen
        if slots.active_session_on(txn.conn, was) is None:
            _set_reseated_from(txn, session_id, was, seen)
    slots.refresh(txn, was, "session.moved")


def _take_back(txn: Txn, slot: sqlite3.Row, session: sqlite3.Row, at: float) -> bool:
    """A re-seat whose new slot reports vacant within `reseat_settle` of the car's first sighting is undone: what
    held past the debounce was no parked car (a flap stretched by a late message, a car pausing there). The
    session goes back, on its way again, to the slot it was re-seated away from, if that is still free; True when
    it did."""
    back = session["reseated_from"]
    if back is None or _timer_at(txn, at) - session["reseated_seen"] > txn.settings.reseat_settle:
        return False
    if slots.active_session_on(txn.conn, back) is not None:
        return False
    target = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (back,)).fetchone()
    _send_back(txn, session["id"], slot["id"], target)
    return True


def _send_back(txn: Txn, session_id: str, from_slot: str, target: sqlite3.Row) -> None:
    """A re-seat undone (`reverted`): the session goes back to `target`, the slot it was re-seated away from, on
    its way again (seated if a car is there, a fresh vacate grace if it is vacant)."""
    txn.conn.execute(
        "UPDATE sessions SET slot = ?, zone = ?, seated_at = NULL, vacant_since = NULL, unseen_at = NULL WHERE id = ?",
        (target["id"], target["zone"], session_id),
    )
    _set_reseated_from(txn, session_id, None)
    txn.emit(SessionMoved(session_id=session_id, from_slot=from_slot, to_slot=target["id"], reason="reverted"))
    if target["sensor_state"] == "occupied":
        txn.conn.execute("UPDATE sessions SET seated_at = ? WHERE id = ?", (txn.now, session_id))
    elif target["sensor_state"] == "vacant":
        _start_vacancy(txn, session_id, txn.timer_now)
    slots.refresh(txn, target["id"], "session.moved")


def _start_vacancy(txn: Txn, session_id: str, since: float) -> None:
    txn.conn.execute("UPDATE sessions SET vacant_since = ? WHERE id = ?", (since, session_id))
    timers.schedule(txn, VACATE, session_id, since + txn.settings.vacate_grace)


def _crossed(txn: Txn, slot: sqlite3.Row, confirmed: float) -> sqlite3.Row | None:
    """A seated session whose own slot reports vacant (its vacate countdown runs), seated crosswise with the
    session that has just ended in `slot` (confirmed at `confirmed`): its car is not where the store has it.

    Two sessions are seated crosswise when the nearest-candidate rule took one car for the other's while both
    were on their way, so they were confirmed within `drive_time` of each other. Then one whose slot has been
    vacant for `drive_time` or more (`_left_long`: a chain of such picks seats them crosswise further apart). In
    each group, same zone first, then the nearest confirmation, then the latest vacancy. Any other session with
    a vacant slot is most likely a car on its way to the exit, and taking that for this car would free its slot
    before it has left (and start the same again when it does). Found through the countdowns, a handful of rows."""
    row: sqlite3.Row | None = txn.conn.execute(
        "SELECT s.id, s.slot, 1 AS seated FROM deadlines d JOIN sessions s ON s.id = d.subject"
        " WHERE d.kind = ?1 AND s.lot = ?2 AND s.state = 'active' AND s.seated_at IS NOT NULL"
        " AND ABS(s.confirmed_timer - ?3) <= ?4"
        " ORDER BY s.zone IS NOT ?5, ABS(s.confirmed_timer - ?3), s.vacant_since DESC, s.id LIMIT 1",
        (VACATE, slot["lot"], confirmed, txn.settings.drive_time, slot["zone"]),
    ).fetchone()
    return row if row is not None else _left_long(txn, slot, confirmed)


def _left_long(txn: Txn, slot: sqlite3.Row, near: float) -> sqlite3.Row | None:
    """A seated session whose slot has been vacant for `drive_time` or more, for a car in `slot` that no session
    on its way is likely to be: its car is in the lot (no exit) but not in its slot, and no car on its way to the
    exit any more (that exit would have come by then). Same zone first, then the confirmation nearest `near`
    (Timeline; a chain of nearest-candidate picks seats sessions crosswise that entered close together), then the
    latest vacancy. Taking one that has just left would free its slot before its car is out, and start the same
    again at its exit."""
    row: sqlite3.Row | None = txn.conn.execute(
        "SELECT s.id, s.slot, s.zone, s.confirmed_timer, NULL AS sensor, 1 AS seated"
        " FROM deadlines d JOIN sessions s ON s.id = d.subject"
        " WHERE d.kind = ?1 AND s.lot = ?2 AND s.state = 'active' AND s.seated_at IS NOT NULL"
        " AND s.vacant_since <= ?3"
        " ORDER BY s.zone IS NOT ?4, ABS(s.confirmed_timer - ?5), s.vacant_since DESC, s.id LIMIT 1",
        (VACATE, slot["lot"], txn.timer_now - txn.settings.drive_time, slot["zone"], near),
    ).fetchone()
    return row


def session_confirmed(txn: Txn, session_id: str) -> None:
    """The vehicle passed the gate: it is on its way for arrival_window; its slot's vacancy counts from now."""
    txn.conn.execute("UPDATE sessions SET confirmed_timer = ? WHERE id = ?", (txn.timer_now, session_id))
    row = txn.conn.execute(
        "SELECT t.sensor_state FROM sessions s JOIN slots t ON t.id = s.slot WHERE s.id = ?", (session_id,)
    ).fetchone()
    if row is not None and row[0] == "vacant":
        _start_vacancy(txn, session_id, txn.timer_now)


def session_closed(txn: Txn, session_id: str, slot_id: str | None) -> None:
    """The session ended or was cancelled (its slot already freed in the store): no vacate countdown any more.

    When its slot still reports a car, that car is someone else's (sessions re-seated onto the wrong cars by
    the nearest-candidate rule swap back here): it is handled as a car that just appeared there.
    """
    timers.cancel(txn, VACATE, session_id)
    _set_reseated_from(txn, session_id, None)
    if slot_id is None:
        return
    slot = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (slot_id,)).fetchone()
    if slot is not None and slot["sensor_state"] == "offline":
        _went_dark(txn, slot_id)
    if slot is None or slot["sensor_state"] != "occupied":
        return
    if not _heard_lately(txn, slot):
        # Silent for half its offline_after, and the car it last saw has most likely just left without a word from
        # it: it is taken as offline now, not a whole offline_after after that word, so it holds no car meanwhile.
        last = txn.now if slot["seen_timer"] is None else _wall_at(txn, slot["seen_timer"])
        _sensor_change(txn, SensorChange(sensor=slot["sensor"], state="offline", at=last))
        return
    (confirmed,) = txn.conn.execute("SELECT confirmed_timer FROM sessions WHERE id = ?", (session_id,)).fetchone()
    _occupied(txn, slot, None, txn.timer_now, swap=confirmed)


@timers.on_due(VACATE)
def _vacate(txn: Txn, session_id: str) -> None:
    row = txn.conn.execute(
        "SELECT s.slot, COALESCE(s.home_zone, s.zone) AS home, s.vacant_since, s.seated_at, t.lot, t.sensor_state,"
        " t.seen_timer, t.offline_after"
        " FROM sessions s JOIN slots t ON t.id = s.slot WHERE s.id = ? AND s.state = 'active'",
        (session_id,),
    ).fetchone()
    if row is None or row["sensor_state"] != "vacant":
        return
    # Heard since the vacancy began, and lately: a sensor that died after the session came (its car then parked
    # over it unseen) has been silent for a while when the grace runs out.
    if not _heard_lately(txn, row) or (row["vacant_since"] is not None and row["seen_timer"] < row["vacant_since"]):
        timers.schedule(txn, VACATE, session_id, txn.timer_now + txn.settings.vacate_recheck)
        return
    slot_id = row["slot"]
    txn.alert(
        "session.vacated",
        "warning",
        {"session": session_id, "slot": slot_id},
        f"slot {slot_id} has been vacant for {txn.settings.vacate_grace:g} s with no exit; the session runs on"
        " without a slot",
    )
    # A grace that runs out on a session re-seated into another zone most likely undoes a wrong pick (a right one's
    # car leaves through the exit soon after its slot): its car is likelier in the zone it was sent to at entry.
    txn.conn.execute(
        "UPDATE sessions SET slot = NULL, zone = ?, seated_at = NULL, vacant_since = NULL, unseen_at = NULL"
        " WHERE id = ?",
        (row["home"], session_id),
    )
    txn.emit(SessionMoved(session_id=session_id, from_slot=slot_id, to_slot=None, reason="vacated"))
    slots.refresh(txn, slot_id, "session.moved")
    _park_unseen(txn, session_id, row["lot"], row["home"])


def _park_unseen(txn: Txn, session_id: str, lot: str, zone: str) -> None:
    """A session whose slot has seen no car of it for its vacate grace (never, or not since it left): the car is in
    the lot (no exit) but in no slot a sensor watches (there it would have been matched to this session), so most
    likely in a free one whose sensor is offline. It is seated there (`unseen`), so the lot's counts hold the car;
    same zone first. None free: it runs on without a slot."""
    row = txn.conn.execute(
        "SELECT * FROM slots WHERE lot = ? AND status = 'available' AND sensor_state = 'offline'"
        " ORDER BY zone IS NOT ?, fill_order LIMIT 1",
        (lot, zone),
    ).fetchone()
    if row is not None:
        _seat_unseen(txn, session_id, row)


def _seat_unseen(txn: Txn, session_id: str, slot: sqlite3.Row) -> None:
    """A guess (`unseen_at`): a car later found without a session is taken for this one's before an alert. The
    session keeps its zone (where its car was last known to be headed), so the guess can move to a slot of that
    zone once one is free (`_went_dark`)."""
    (was,) = txn.conn.execute("SELECT slot FROM sessions WHERE id = ?", (session_id,)).fetchone()
    txn.conn.execute(
        "UPDATE sessions SET slot = ?, unseen_at = ? WHERE id = ?", (slot["id"], txn.timer_now, session_id)
    )
    txn.emit(SessionMoved(session_id=session_id, from_slot=was, to_slot=slot["id"], reason="unseen"))
    slots.refresh(txn, slot["id"], "session.moved")
    if was is not None:
        slots.refresh(txn, was, "session.moved")
        _went_dark(txn, was)


def _went_dark(txn: Txn, slot_id: str) -> None:
    """A free slot that no sensor watches any more (its sensor has just gone offline, or the session held there
    has ended or left it): a car may be over it unseen. Seated there, `unseen`: a session of its zone running on
    without a slot (its car is in the lot and in no slot a sensor watches), else one of its zone placed unseen in
    another zone (no slot of its own zone was free then), else one of another zone without a slot; the one
    confirmed first. Each move puts a session in its own zone, so the chain it may start (the slot left behind) ends."""
    slot = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (slot_id,)).fetchone()
    if slot["sensor_state"] != "offline" or slot["status"] != "available":
        return
    row = txn.conn.execute(
        "SELECT s.id FROM sessions s INDEXED BY sessions_unseated LEFT JOIN slots t ON t.id = s.slot"
        " WHERE s.lot = ?1 AND s.state = 'active' AND s.seated_at IS NULL AND s.confirmed_timer IS NOT NULL"
        " AND (s.slot IS NULL OR (s.unseen_at IS NOT NULL AND s.zone = ?2 AND t.zone IS NOT ?2"
        " AND t.sensor_state = 'offline'))"
        " ORDER BY s.zone IS NOT ?2, s.slot IS NOT NULL, s.confirmed_timer, s.id LIMIT 1",
        (slot["lot"], slot["zone"]),
    ).fetchone()
    if row is not None:
        _seat_unseen(txn, row["id"], slot)


@timers.on_due(RESEATED)
def _reseated_due(txn: Txn, session_id: str) -> None:
    # The arrival window is over: its car is not driving to the slot it was re-seated away from any more.
    _set_reseated_from(txn, session_id, None)


@timers.on_due(RECHECK)
def _recheck(txn: Txn, session_id: str) -> None:
    """A session re-seated across zones, at the end of the drive_time of a session of another zone it was
    picked over (one on its way when the car was first seen): if neither car has arrived since (the re-seated
    one's slot still vacant and free, the other still on its way), one of them stands where no sensor sees it.

    - The other older: the car is more likely its, whose drive is over, than the re-seated one's, still
      driving: they swap. Not when a free slot of its zone has no sensor watching it: its car has more likely
      parked there.
    - The other younger (both drives over): they swap when that is likelier, the car here the other's and the
      re-seated one's unseen (`_unseen_share`: a zone whose free slots are mostly dark hides its misparked cars).
      Not when another car was found away from its session's slot during the other's drive: that may be its.

    The other remembers its own slot as `_occupied` would (a car there soon is its after all, and the car is
    matched again); the re-seated one is on its way again, a fresh vacate grace for its slot. No swap, and a
    younger one still driving: looked at again when its drive_time ends."""
    row = txn.conn.execute(
        "SELECT id, slot, reseated_from, reseated_seen, confirmed_timer FROM sessions"
        " WHERE id = ? AND state = 'active'",
        (session_id,),
    ).fetchone()
    if row is None or row["reseated_from"] is None or row["slot"] is None:
        return
    here = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (row["slot"],)).fetchone()
    back = txn.conn.execute("SELECT * FROM slots WHERE id = ?", (row["reseated_from"],)).fetchone()
    if here["sensor_state"] != "occupied" or back["sensor_state"] != "vacant":
        return
    if slots.active_session_on(txn.conn, back["id"]) is not None:
        return
    seen, drive = row["reseated_seen"], txn.settings.drive_time
    others = txn.conn.execute(
        "SELECT s.id, s.slot, s.zone, s.confirmed_timer FROM sessions s INDEXED BY sessions_unseated"
        " JOIN slots t ON t.id = s.slot"
        " WHERE s.lot = ? AND s.state = 'active' AND s.seated_at IS NULL AND s.zone IS NOT ?"
        " AND s.confirmed_timer >= ? AND s.confirmed_timer <= ? AND t.sensor_state = 'vacant'"
        " ORDER BY s.confirmed_timer, s.id",
        (here["lot"], back["zone"], seen - drive, seen - GATE_TO_SLOT),
    ).fetchall()
    if not others:
        return
    free, dark = _free_by_zone(txn, here["lot"])
    free[here["zone"]] = free.get(here["zone"], 0) + 1  # as when the car chose it
    lot_free = sum(free.values())

    def likelier(other: sqlite3.Row) -> bool:
        """Whether the car here is likelier the other's (its own car then unseen) than the re-seated one's."""
        if other["confirmed_timer"] < row["confirmed_timer"]:
            return dark.get(other["zone"], 0) == 0
        # Another car found away from its session's slot while the other's car drove in may be the other's.
        if txn.conn.execute(
            "SELECT 1 FROM sessions INDEXED BY sessions_reseated_from WHERE state = 'active'"
            " AND reseated_from IS NOT NULL AND id != ? AND reseated_seen BETWEEN ? AND ?",
            (session_id, other["confirmed_timer"], other["confirmed_timer"] + drive),
        ).fetchone():
            return False
        theirs = _zone_share(free, lot_free, here["zone"], other["zone"]) * _unseen_share(free, dark, back["zone"])
        ours = _zone_share(free, lot_free, here["zone"], back["zone"]) * _unseen_share(free, dark, other["zone"])
        return theirs > ours

    still_driving = []
    for other in others:
        if other["confirmed_timer"] > txn.timer_now - drive:
            still_driving.append(other["confirmed_timer"])
        elif likelier(other):
            _send_back(txn, session_id, here["id"], back)
            _reseat(txn, other["id"], here, other["slot"], seen, remember=True)
            slots.refresh(txn, here["id"], "session.moved")
            return
    if still_driving:
        timers.schedule(txn, RECHECK, session_id, min(still_driving) + drive)


@timers.on_due(OFFLINE)
def _offline(txn: Txn, sensor: str) -> None:
    # Only after a restart: while the gateway runs, the ingress's memory fires first (the row lies beyond it).
    _sensor_change(txn, SensorChange(sensor=sensor, state="offline", at=txn.now))


def sensors_seen(txn: Txn, cmd: SensorsSeen) -> dict[str, Any]:
    """Move stored offline deadlines (the ingress's periodic flush); a sensor not live in the store keeps none."""
    moved = 0
    for sensor, seen, due in cmd.deadlines:
        row = txn.conn.execute("SELECT id, sensor_state FROM slots WHERE sensor = ?", (sensor,)).fetchone()
        if row is not None and row[1] in LIVE_STATES:
            timers.schedule(txn, OFFLINE, sensor, due)
            txn.conn.execute(
                "UPDATE slots SET seen_timer = MAX(COALESCE(seen_timer, ?1), ?1) WHERE id = ?2", (seen, row[0])
            )
            moved += 1
    return {"moved": moved}


def battery_report(txn: Txn, cmd: BatteryReport) -> dict[str, Any]:
    row = txn.conn.execute("SELECT id, battery_alerted FROM slots WHERE sensor = ?", (cmd.sensor,)).fetchone()
    if row is None:
        return {"alerted": False}
    alerted = row["battery_alerted"]
    if not cmd.low:
        if alerted is not None:
            txn.conn.execute("UPDATE slots SET battery_alerted = NULL WHERE id = ?", (row["id"],))
        return {"alerted": False}
    if alerted is not None and txn.timer_now - alerted < BATTERY_REPEAT_S:
        return {"alerted": False}
    txn.conn.execute("UPDATE slots SET battery_alerted = ? WHERE id = ?", (txn.timer_now, row["id"]))
    txn.alert(
        "sensor.battery_low",
        "warning",
        {"slot": row["id"], "sensor": cmd.sensor},
        f"sensor {cmd.sensor} reports {cmd.volts:.2f} V, below {cmd.threshold:.2f} V",
    )
    return {"alerted": True}


def rearm(txn: Txn, _cmd: Rearm) -> dict[str, Any]:
    """At start: make the deadline rows match the invariants (a store from an older release, a changed config)."""
    conn = txn.conn
    conn.execute(
        "DELETE FROM deadlines WHERE kind = ? AND subject NOT IN"
        " (SELECT sensor FROM slots WHERE sensor_state IN ('vacant', 'occupied'))",
        (OFFLINE,),
    )
    conn.execute(
        "INSERT INTO deadlines (kind, subject, due, wall)"
        " SELECT ?, sensor, ? + COALESCE(offline_after, ?), 0 FROM slots t"
        " WHERE sensor_state IN ('vacant', 'occupied')"
        " AND NOT EXISTS (SELECT 1 FROM deadlines d WHERE d.kind = ? AND d.subject = t.sensor)",
        (OFFLINE, txn.timer_now, txn.settings.sensor_offline_after, OFFLINE),
    )
    vacating = (
        "SELECT s.id FROM sessions s JOIN slots t ON t.id = s.slot"
        " WHERE s.state = 'active' AND s.confirmed_timer IS NOT NULL AND t.sensor_state = 'vacant'"
    )
    conn.execute(f"DELETE FROM deadlines WHERE kind = ? AND subject NOT IN ({vacating})", (VACATE,))
    conn.execute(
        f"UPDATE sessions SET vacant_since = ? WHERE vacant_since IS NULL AND id IN ({vacating})", (txn.timer_now,)
    )
    conn.execute(
        f"INSERT INTO deadlines (kind, subject, due, wall) SELECT ?, id, ?, 0 FROM ({vacating}) v"
        " WHERE NOT EXISTS (SELECT 1 FROM deadlines d WHERE d.kind = ? AND d.subject = v.id)",
        (VACATE, txn.timer_now + txn.settings.vacate_grace, VACATE),
    )
    txn.deadlines_changed = True
    return {}
