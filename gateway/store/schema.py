"""The SQLite store: schema, migrations and connection settings."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

DB_NAME = "gateway.db"

# Each entry upgrades user_version i -> i+1. Never edit a shipped step: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE lots (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '');
    CREATE TABLE zones (lot TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (lot, id));
    CREATE TABLE slots (
        id TEXT PRIMARY KEY,
        lot TEXT NOT NULL,
        zone TEXT NOT NULL,
        type TEXT NOT NULL,
        sensor TEXT NOT NULL,
        offline_after REAL,
        fill_order INTEGER NOT NULL,
        -- derived from sessions, blocks, reservations and sensor evidence; kept in step by the writer
        status TEXT NOT NULL DEFAULT 'available'
            CHECK (status IN ('available', 'occupied', 'reserved', 'blocked')),
        since REAL NOT NULL,
        blocked INTEGER NOT NULL DEFAULT 0,
        block_reason TEXT,
        sensor_state TEXT NOT NULL DEFAULT 'none'
            CHECK (sensor_state IN ('none', 'vacant', 'occupied', 'offline')),
        -- 0: sensor reports vacant, 1: no report yet, 2: sensor offline; allocation prefers low ranks
        alloc_rank INTEGER NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX slots_sensor ON slots (sensor);
    CREATE INDEX slots_alloc_type ON slots (lot, type, status, alloc_rank, fill_order);
    CREATE INDEX slots_alloc_zone ON slots (lot, zone, type, status, alloc_rank, fill_order);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        lot TEXT NOT NULL,
        zone TEXT,
        slot TEXT,
        plate TEXT,               -- normalised; erased after the retention period
        vehicle TEXT NOT NULL,    -- the token
        state TEXT NOT NULL CHECK (state IN ('active', 'ended', 'cancelled')),
        entry_gate TEXT,
        exit_gate TEXT,
        reservation_id TEXT,
        started_at REAL NOT NULL,
        confirmed_at REAL,
        ended_at REAL,
        duration_s INTEGER,
        fee_amount INTEGER,
        fee_currency TEXT
    );
    -- the second fence behind the single writer (guarantee 1)
    CREATE UNIQUE INDEX sessions_one_per_slot ON sessions (slot) WHERE state = 'active' AND slot IS NOT NULL;
    CREATE UNIQUE INDEX sessions_one_per_vehicle ON sessions (lot, vehicle) WHERE state = 'active';
    CREATE INDEX sessions_active_plate ON sessions (plate, lot) WHERE state = 'active';
    CREATE INDEX sessions_ended_at ON sessions (ended_at) WHERE state != 'active';
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        reply TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX idempotency_created ON idempotency (created_at);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        created_at REAL NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE rejections (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        source TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('next_seq', '1');
    """,
    # 2: deadlines as data (gateway/core/timers.py); wall = 0: on the writer's Timeline, 1: wall-clock time
    """
    CREATE TABLE deadlines (
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        due REAL NOT NULL,
        wall INTEGER NOT NULL DEFAULT 0 CHECK (wall IN (0, 1)),
        PRIMARY KEY (kind, subject)
    );
    CREATE INDEX deadlines_due ON deadlines (wall, due);
    """,
    # 3: reservations (gateway/core/reservations.py), payments and the occupancy factor (gateway/core/exits.py),
    # kept per-lot counts (the factor's occupied/total without a scan of every slot).
    # A reservation is live while 'booked' (its hold has not begun) or 'held' (the slot's status is reserved).
    """
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        lot TEXT NOT NULL,
        zone TEXT,                -- the requested zone, NULL: any
        type TEXT NOT NULL,       -- the slot type it holds
        slot TEXT NOT NULL,
        plate TEXT,               -- normalised; erased with the row after the retention period
        vehicle TEXT NOT NULL,    -- the token
        start_at REAL NOT NULL,
        end_at REAL NOT NULL,
        hold_from REAL NOT NULL,  -- later of start - hold_ahead and the end of the slot's previous live reservation
        state TEXT NOT NULL CHECK (state IN ('booked', 'held', 'arrived', 'cancelled', 'no_show')),
        created_at REAL NOT NULL,
        closed_at REAL,
        session_id TEXT,
        request TEXT NOT NULL,    -- the request's fields as decided on (idempotency by reservation_id)
        reply TEXT NOT NULL       -- the first answer
    );
    -- The interval probe: a slot's live reservations by end; they are disjoint, so ordered by start as well.
    CREATE INDEX reservations_live_slot ON reservations (slot, end_at) WHERE state IN ('booked', 'held');
    CREATE INDEX reservations_live_vehicle ON reservations (lot, vehicle, start_at) WHERE state IN ('booked', 'held');
    CREATE INDEX reservations_closed ON reservations (closed_at) WHERE state NOT IN ('booked', 'held');
    ALTER TABLE sessions ADD COLUMN factor TEXT NOT NULL DEFAULT '1';  -- exact fraction, str(Fraction)
    ALTER TABLE sessions ADD COLUMN paid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN paid_at REAL;
    ALTER TABLE sessions ADD COLUMN paid_until REAL;
    CREATE TABLE payments (
        payment_ref TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        amount INTEGER NOT NULL,
        at REAL NOT NULL,
        reply TEXT NOT NULL
    );
    CREATE INDEX payments_at ON payments (at);
    -- Re-read keys of refused exits: a payment ends their window (the next read is a new decision).
    CREATE TABLE exit_refusals (key TEXT PRIMARY KEY, session_id TEXT NOT NULL);
    CREATE INDEX exit_refusals_session ON exit_refusals (session_id);
    ALTER TABLE lots ADD COLUMN total INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE lots ADD COLUMN occupied INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: the outbox's size, kept by the writer with each commit (its bound is checked without a scan; a
    # trigger per row cost 15 us an event), and an index to find superseded slot.status events for
    # compaction (on an expression: the event rows stay as they are).
    """
    CREATE TABLE outbox_size (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        rows INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    );
    INSERT INTO outbox_size (id, rows, bytes) SELECT 1, COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox;
    CREATE INDEX outbox_slot_status ON outbox (json_extract(body, '$.slot'), seq) WHERE type = 'slot.status';
    """,
    # 5: sensors and sessions (gateway/core/reconcile.py). confirmed_timer: when the session was confirmed, on the
    # writer's Timeline (arrival_window is a duration: immune to wall steps); seated_at: when a sensor saw the car
    # in its slot (NULL: on its way, or roaming without a slot); vacant_since: when its slot's vacancy began
    # (Timeline); battery_alerted: Timeline time of the last low-battery alert (NULL: the battery is fine);
    # seen_timer: when the sensor was last heard as far as the store knows (written with its offline deadline,
    # never per heartbeat).
    """
    ALTER TABLE sessions ADD COLUMN confirmed_timer REAL;
    ALTER TABLE sessions ADD COLUMN seated_at REAL;
    ALTER TABLE sessions ADD COLUMN vacant_since REAL;
    ALTER TABLE slots ADD COLUMN seen_timer REAL;
    UPDATE sessions SET confirmed_timer = confirmed_at;
    UPDATE sessions SET seated_at = confirmed_at
        WHERE state = 'active' AND slot IN (SELECT id FROM slots WHERE sensor_state = 'occupied');
    CREATE INDEX sessions_unseated ON sessions (lot, confirmed_timer) WHERE state = 'active' AND seated_at IS NULL;
    ALTER TABLE slots ADD COLUMN battery_alerted REAL;
    """,
    # 6: barrier lanes (gateway/core/lanes.py). `gates`: one row per gate with a serial controller (made to match
    # the config at start): the mode the gateway asks for, and what the controller last reported, written when it
    # changes (for `status`). `gate_actions`: OPENs decided and not yet acknowledged by the controller.
    # `gate_events`: the last controller events applied per gate, by GCP/1 seq (a redelivery is applied once).
    """
    CREATE TABLE gates (
        id TEXT PRIMARY KEY,
        mode TEXT NOT NULL DEFAULT 'normal' CHECK (mode IN ('normal', 'locked_open', 'locked_closed')),
        barrier TEXT,
        reported_mode TEXT,
        loops INTEGER,
        online INTEGER,
        heard_at REAL,
        changed_at REAL,
        faults INTEGER NOT NULL DEFAULT 0,
        last_fault TEXT,
        last_fault_at REAL
    );
    CREATE TABLE gate_actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        gate TEXT NOT NULL,
        reason TEXT NOT NULL CHECK (reason IN ('entry', 'exit', 'manual')),
        session_id TEXT,
        display TEXT,
        expires REAL NOT NULL,    -- the writer's Timeline: not sent after this
        created_at REAL NOT NULL
    );
    CREATE INDEX gate_actions_session ON gate_actions (session_id) WHERE session_id IS NOT NULL;
    CREATE TABLE gate_events (
        gate TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event TEXT NOT NULL,
        at REAL NOT NULL,         -- the writer's Timeline
        PRIMARY KEY (gate, seq)
    );
    CREATE INDEX sessions_unconfirmed ON sessions (entry_gate, started_at)
        WHERE state = 'active' AND confirmed_at IS NULL;
    """,
    # 7: re-seating that can be taken back (gateway/core/reconcile.py). reseated_from: the slot a session on its
    # way was re-seated away from, while its car may still be driving there (until confirmed + arrival_window);
    # reseated_seen: when the car it was re-seated to was first seen there (Timeline). alloc_rank on a scale with
    # room for that slot's place within its sensor tier: 2 x (vacant 0, none 1, offline 2, occupied 3), + 1 for a
    # slot someone was re-seated away from, + 8 with a reservation ahead (was + 4).
    """
    ALTER TABLE sessions ADD COLUMN reseated_from TEXT;
    ALTER TABLE sessions ADD COLUMN reseated_seen REAL;
    CREATE INDEX sessions_reseated_from ON sessions (reseated_from)
        WHERE state = 'active' AND reseated_from IS NOT NULL;
    UPDATE slots SET alloc_rank = 2 * (alloc_rank % 4) + 8 * (alloc_rank / 4);
    """,
    # 8: unseen_at: when a session whose car no watched slot holds was put in a free slot whose sensor is offline
    # (Timeline; NULL: it was not, or it has been seated or moved since). A guess: such a session stays a candidate
    # for a car found without a session (gateway/core/reconcile.py).
    """
    ALTER TABLE sessions ADD COLUMN unseen_at REAL;
    """,
    # 9: home_zone: the zone the session was given at entry. Re-seats move `zone` with the car they take the session
    # for; a session released by its vacate grace goes back to this one (gateway/core/reconcile.py, `_vacate`).
    """
    ALTER TABLE sessions ADD COLUMN home_zone TEXT;
    UPDATE sessions SET home_zone = zone;
    """,
)

Synchronous = Literal["FULL", "NORMAL"]


class StoreError(Exception):
    pass


def db_path(state_dir: Path) -> Path:
    return state_dir / DB_NAME


def connect(path: Path, *, synchronous: Synchronous = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """A connection with the project's settings; autocommit mode, transactions are explicit."""
    if readonly:
        if not path.exists():
            raise StoreError(f"{path}: no store here (has the gateway run with this config?)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns it. Refuses a store from a newer release."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise StoreError(
            f"store schema version {version} is newer than this release knows ({len(MIGRATIONS)}); upgrade"
        )
    for target in range(version + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split(MIGRATIONS[target - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def _split(script: str) -> Iterable[str]:
    # executescript() would COMMIT our open transaction; run statement by statement instead.
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip():
        yield buf
