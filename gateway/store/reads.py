"""The daemon's read side: its own aiosqlite connection (WAL readers never block the writer)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.core.domain import GateAction
from gateway.store import availability


class ReadStore:
    """A service: opened once the writer has created and migrated the store, closed after the writer stops."""

    name = "store"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def start(self) -> None:
        if self._db is None:
            self._db = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
            await self._db.execute("PRAGMA busy_timeout=5000")
            # Reads are index probes and small scans: a small page cache (the writer keeps SQLite's 2 MiB).
            await self._db.execute("PRAGMA cache_size=-256")

    async def run(self) -> None:
        return

    async def stop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def health(self) -> dict[str, Any]:
        return {"outbox_backlog": await self.outbox_backlog(), "db_bytes": self.db_bytes()}

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the read connection is not open")
        return self._db

    async def availability(self, lot: str, zone: str | None = None, type_: str | None = None) -> dict[str, Any]:
        sql, args = availability.query(lot, zone, type_)
        async with self._conn.execute(sql, args) as cur:
            rows = [(str(z), str(t), str(s), str(x), int(n)) for z, t, s, x, n in await cur.fetchall()]
        return availability.fold(lot, rows)

    async def slots(self) -> AsyncIterator[dict[str, Any]]:
        sql = (
            "SELECT t.id, t.lot, t.zone, t.type, t.status, t.since, t.sensor, t.sensor_state,"
            " (SELECT s.id FROM sessions s WHERE s.slot = t.id AND s.state = 'active') FROM slots t"
            " ORDER BY t.lot, t.fill_order"
        )
        keys = ("slot", "lot", "zone", "type", "status", "since", "sensor_id", "sensor", "session")
        # Streamed, 64 rows a hop: 10,000s of rows held at once would stay as RSS after they are freed.
        async with self._conn.execute(sql) as cur:
            async for row in cur:
                yield dict(zip(keys, row, strict=True))

    async def sensor_states(self) -> list[tuple[str, bool]]:
        """(sensor id, occupied) of every sensor whose committed state is a report (not none or offline)."""
        sql = "SELECT sensor, sensor_state = 'occupied' FROM slots WHERE sensor_state IN ('occupied', 'vacant')"
        async with self._conn.execute(sql) as cur:
            return [(str(sensor), bool(occupied)) for sensor, occupied in await cur.fetchall()]

    async def battery_alerts(self) -> list[tuple[str, float]]:
        """(sensor id, when last alerted on the Timeline) of every sensor whose battery is known low."""
        sql = "SELECT sensor, battery_alerted FROM slots WHERE battery_alerted IS NOT NULL"
        async with self._conn.execute(sql) as cur:
            return [(str(sensor), float(at)) for sensor, at in await cur.fetchall()]

    async def deadlines(self, kind: str) -> dict[str, float]:
        """The stored deadlines of one kind: subject -> due."""
        async with self._conn.execute("SELECT subject, due FROM deadlines WHERE kind = ?", (kind,)) as cur:
            return {str(subject): float(due) for subject, due in await cur.fetchall()}

    async def sessions(self, lot: str | None, active: bool | None, limit: int = 1000) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, lot, zone, slot, vehicle, state, entry_gate, exit_gate, started_at, ended_at, duration_s,"
            " fee_amount, fee_currency FROM sessions WHERE 1 = 1"
        )
        args: list[Any] = []
        if lot is not None:
            sql += " AND lot = ?"
            args.append(lot)
        if active is not None:
            sql += " AND state = 'active'" if active else " AND state != 'active'"
        sql += " ORDER BY started_at DESC LIMIT ?"
        args.append(limit)
        keys = (
            "session_id", "lot", "zone", "slot", "vehicle", "state", "entry_gate", "exit_gate", "started_at",
            "ended_at", "duration_s", "fee_amount", "fee_currency",
        )  # fmt: skip
        async with self._conn.execute(sql, args) as cur:
            return [dict(zip(keys, row, strict=True)) for row in await cur.fetchall()]

    async def transaction_verb(self, key: str) -> str | None:
        """The verb a stored idempotency key belongs to (None: unknown key, or a row without one)."""
        async with self._conn.execute("SELECT reply FROM idempotency WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        verb = json.loads(row[0]).get("verb")
        return verb if isinstance(verb, str) else None

    async def active_session(
        self, *, session_id: str | None = None, lot: str | None = None, token: str | None = None
    ) -> dict[str, Any] | None:
        """An active session by id, or by (lot, vehicle token), with what its fee needs (`quote`)."""
        cols = "id, lot, started_at, factor, paid, paid_at, paid_until"
        args: list[str | None]
        if session_id is not None:
            sql, args = f"SELECT {cols} FROM sessions WHERE id = ? AND state = 'active'", [session_id]
        else:
            sql, args = f"SELECT {cols} FROM sessions WHERE lot = ? AND vehicle = ? AND state = 'active'", [lot, token]
        async with self._conn.execute(sql, args) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return dict(zip(("id", "lot", "started_at", "factor", "paid", "paid_at", "paid_until"), row, strict=True))

    async def gate_modes(self) -> dict[str, str]:
        """The mode the gateway asks of each barrier gate (set_gate_mode)."""
        async with self._conn.execute("SELECT id, mode FROM gates") as cur:
            return {str(g): str(m) for g, m in await cur.fetchall()}

    async def gate_actions(self) -> list[GateAction]:
        """The OPENs decided and not yet acknowledged by their controller, oldest first."""
        sql = "SELECT id, gate, session_id, display, expires FROM gate_actions ORDER BY id"
        async with self._conn.execute(sql) as cur:
            return [
                GateAction(gate, open=True, display=display, pending=int(i), session_id=sid, expires=float(expires))
                for i, gate, sid, display, expires in await cur.fetchall()
            ]

    async def outbox_backlog(self) -> int:
        async with self._conn.execute("SELECT rows FROM outbox_size") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    def db_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            p = Path(f"{self.path}{suffix}")
            if p.exists():
                total += p.stat().st_size
        return total
