"""`parking-gateway status`: what the store says, read on its own connection."""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.store.availability import availability, lots


def status_document(conn: sqlite3.Connection) -> dict[str, Any]:
    conn.execute("BEGIN")
    try:
        doc: dict[str, Any] = {"lots": [availability(conn, lot) for lot in lots(conn)]}
        doc["sensors"] = {
            str(state): int(n)
            for state, n in conn.execute("SELECT sensor_state, COUNT(*) FROM slots GROUP BY sensor_state")
        }
        n, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox").fetchone()
        doc["outbox"] = {"backlog": int(n), "bytes": int(size)}
        doc["sessions_active"] = int(conn.execute("SELECT COUNT(*) FROM sessions WHERE state = 'active'").fetchone()[0])
        doc["rejections"] = [
            {"at": r[0], "source": r[1], "reason": r[2], "detail": r[3]}
            for r in conn.execute("SELECT at, source, reason, detail FROM rejections ORDER BY id DESC LIMIT 10")
        ]
    finally:
        conn.execute("COMMIT")
    return doc


def render_text(doc: dict[str, Any]) -> str:
    lines = []
    for lot in doc["lots"]:
        lines.append(
            f"lot {lot['lot']}: {lot['available']}/{lot['total']} available, {lot['occupied']} occupied,"
            f" {lot['reserved']} reserved, {lot['blocked']} blocked"
        )
        for title, group in (("zone", lot["zones"]), ("type", lot["types"])):
            for name, c in group.items():
                lines.append(f"  {title} {name:<12} {c['available']:>6}/{c['total']:<6} available")
    sensors = ", ".join(f"{k} {v}" for k, v in sorted(doc["sensors"].items()))
    lines.append(f"sensors: {sensors}")
    lines.append(f"active sessions: {doc['sessions_active']}")
    lines.append(f"outbox: {doc['outbox']['backlog']} events, {doc['outbox']['bytes']} bytes")
    if doc["rejections"]:
        lines.append(f"last rejection: {doc['rejections'][0]['source']}: {doc['rejections'][0]['reason']}")
    return "\n".join(lines)
