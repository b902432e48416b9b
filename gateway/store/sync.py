"""Lots, zones and slots made to match the config at start, inside one transaction."""

from __future__ import annotations

import sqlite3

from gateway.config import SlotSpec
from gateway.core.slots import alloc_rank
from gateway.store.schema import StoreError


def sync_config(conn: sqlite3.Connection, lots: dict[str, str], specs: list[SlotSpec], now: float) -> None:
    """Make lots, zones and slots match the config; refuse to drop a slot that a session occupies.

    `now` (wall time) is a new slot's `since`: the caller's clock, so a test's simulated day agrees with itself.
    """
    wanted = {s.id: s for s in specs}
    conn.execute("BEGIN IMMEDIATE")
    try:
        # id -> (lot, type) only: a Row per slot would stay as RSS of a 100,000-slot daemon long after this returns.
        existing: dict[str, tuple[str, str]] = {
            sid: (lot, type_) for sid, lot, type_ in conn.execute("SELECT id, lot, type FROM slots").fetchall()
        }
        gone = [sid for sid in existing if sid not in wanted]
        moved = [sid for sid, (lot, _) in existing.items() if sid in wanted and lot != wanted[sid].lot]
        busy = _busy_slots(conn, gone + moved)
        if busy:
            raise StoreError(
                "config removes or moves slots that have an active session: "
                + ", ".join(sorted(busy))
                + " (end those sessions first)"
            )
        retyped = [sid for sid, (_, type_) in existing.items() if sid in wanted and type_ != wanted[sid].type]
        booked = _reserved_slots(conn, gone + moved + retyped)
        if booked:
            raise StoreError(
                "config removes, moves or retypes slots that hold live reservations: "
                + ", ".join(sorted(booked))
                + " (cancel those reservations first)"
            )
        for lot_id, name in lots.items():
            conn.execute(
                "INSERT INTO lots (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                (lot_id, name),
            )
        conn.executemany("DELETE FROM slots WHERE id = ?", [(sid,) for sid in gone])
        # Sensor ids are unique; clear the old ones first so a swap of sensors between slots does not collide.
        conn.executemany(
            "UPDATE slots SET sensor = '#' || id WHERE id = ?", [(s.id,) for s in specs if s.id in existing]
        )
        for s in specs:
            if s.id in existing:
                conn.execute(
                    "UPDATE slots SET lot = ?, zone = ?, type = ?, sensor = ?, offline_after = ?, fill_order = ?"
                    " WHERE id = ?",
                    (s.lot, s.zone, s.type, s.sensor, s.offline_after, s.fill_order, s.id),
                )
            else:
                conn.execute(
                    "INSERT INTO slots (id, lot, zone, type, sensor, offline_after, fill_order, since, alloc_rank)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    # The column's default is the rank of schema 1's scale (migration 7 doubled it).
                    (s.id, s.lot, s.zone, s.type, s.sensor, s.offline_after, s.fill_order, now, alloc_rank("none")),
                )
        conn.execute("DELETE FROM zones")
        conn.executemany("INSERT OR IGNORE INTO zones (lot, id) VALUES (?, ?)", {(s.lot, s.zone) for s in specs})
        conn.execute("DELETE FROM lots WHERE id NOT IN (SELECT DISTINCT lot FROM slots)")
        # The writer keeps these in step from here on (gateway/core/slots.py: refresh).
        conn.execute(
            "UPDATE lots SET total = (SELECT COUNT(*) FROM slots WHERE slots.lot = lots.id),"
            " occupied = (SELECT COUNT(*) FROM slots WHERE slots.lot = lots.id AND status = 'occupied')"
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def sync_gates(conn: sqlite3.Connection, gate_ids: list[str]) -> None:
    """One `gates` row per gate with a barrier controller; a gate gone from the config takes its row with it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("INSERT OR IGNORE INTO gates (id) VALUES (?)", [(g,) for g in gate_ids])
        known = set(gate_ids)
        gone = [(g,) for (g,) in conn.execute("SELECT id FROM gates").fetchall() if g not in known]
        conn.executemany("DELETE FROM gates WHERE id = ?", gone)
        conn.executemany("DELETE FROM gate_actions WHERE gate = ?", gone)
        conn.executemany("DELETE FROM gate_events WHERE gate = ?", gone)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _busy_slots(conn: sqlite3.Connection, slot_ids: list[str]) -> set[str]:
    busy: set[str] = set()
    for sid in slot_ids:
        row = conn.execute("SELECT 1 FROM sessions WHERE slot = ? AND state = 'active'", (sid,)).fetchone()
        if row is not None:
            busy.add(sid)
    return busy


def _reserved_slots(conn: sqlite3.Connection, slot_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for sid in slot_ids:
        row = conn.execute(
            "SELECT 1 FROM reservations WHERE slot = ? AND state IN ('booked', 'held') LIMIT 1", (sid,)
        ).fetchone()
        if row is not None:
            found.add(sid)
    return found
