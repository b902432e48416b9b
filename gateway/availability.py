"""The availability document (contract §3.2), computed from the store's slot statuses."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from gateway.txn import iso_ms

STATUSES = ("available", "occupied", "reserved", "blocked")


def _counts() -> dict[str, int]:
    return {"total": 0, **{s: 0 for s in STATUSES}}


def availability(
    conn: sqlite3.Connection, lot: str, *, zone: str | None = None, type_: str | None = None, now: float | None = None
) -> dict[str, Any]:
    sql = "SELECT zone, type, status, COUNT(*) FROM slots WHERE lot = ?"
    args: list[Any] = [lot]
    if zone is not None:
        sql += " AND zone = ?"
        args.append(zone)
    if type_ is not None:
        sql += " AND type = ?"
        args.append(type_)
    doc: dict[str, Any] = {"lot": lot, "ts": iso_ms(time.time() if now is None else now), **_counts()}
    zones: dict[str, dict[str, int]] = {}
    types: dict[str, dict[str, int]] = {}
    for z, t, status, n in conn.execute(sql + " GROUP BY zone, type, status ORDER BY zone, type", args):
        for bucket in (doc, zones.setdefault(z, _counts()), types.setdefault(t, _counts())):
            bucket["total"] += n
            bucket[status] += n
    doc["zones"] = zones
    doc["types"] = types
    return doc


def lots(conn: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT id FROM lots ORDER BY id")]
