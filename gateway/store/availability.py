"""The availability document (contract §3.2): counts per lot, zone and type, and the lot's slots by sensor state.

One fold for the published document (gateway/services/publisher.py, from its kept counts) and the `availability`
request and `status` (from the store), so both say the same.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from gateway.core.clock import iso_ms

STATUSES = ("available", "occupied", "reserved", "blocked")
SENSOR_STATES = ("vacant", "occupied", "offline", "none")


def _counts() -> dict[str, int]:
    return {"total": 0, **{s: 0 for s in STATUSES}}


def query(lot: str, zone: str | None = None, type_: str | None = None) -> tuple[str, list[Any]]:
    sql = "SELECT zone, type, status, sensor_state, COUNT(*) FROM slots WHERE lot = ?"
    args: list[Any] = [lot]
    if zone is not None:
        sql += " AND zone = ?"
        args.append(zone)
    if type_ is not None:
        sql += " AND type = ?"
        args.append(type_)
    return sql + " GROUP BY zone, type, status, sensor_state ORDER BY zone, type", args


def fold(lot: str, rows: Iterable[tuple[str, str, str, str, int]], now: float | None = None) -> dict[str, Any]:
    """Build the document from (zone, type, status, sensor state, count) rows."""
    doc: dict[str, Any] = {"lot": lot, "ts": iso_ms(time.time() if now is None else now), **_counts()}
    zones: dict[str, dict[str, int]] = {}
    types: dict[str, dict[str, int]] = {}
    sensors = dict.fromkeys(SENSOR_STATES, 0)
    for z, t, status, sensor, n in rows:
        for bucket in (doc, zones.setdefault(z, _counts()), types.setdefault(t, _counts())):
            bucket["total"] += n
            bucket[status] += n
        sensors[sensor] += n
    doc["zones"] = dict(sorted(zones.items()))
    doc["types"] = dict(sorted(types.items()))
    doc["sensors"] = sensors
    return doc


def availability(
    conn: sqlite3.Connection, lot: str, *, zone: str | None = None, type_: str | None = None, now: float | None = None
) -> dict[str, Any]:
    sql, args = query(lot, zone, type_)
    return fold(lot, conn.execute(sql, args), now)


def lots(conn: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT id FROM lots ORDER BY id")]
