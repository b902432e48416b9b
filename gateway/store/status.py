"""`parking-gateway status`: what the store says, read on its own connection."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from gateway.core.clock import iso_ms
from gateway.store.availability import availability, lots


def status_document(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    conn.execute("BEGIN")
    try:
        doc: dict[str, Any] = {"lots": [availability(conn, lot) for lot in lots(conn)]}
        doc["sensors"] = {
            str(state): int(n)
            for state, n in conn.execute("SELECT sensor_state, COUNT(*) FROM slots GROUP BY sensor_state")
        }
        # The slots an operator should look at: a silent sensor, a low battery, a car without a session.
        doc["sensors_offline"] = [
            {"slot": r[0], "sensor": r[1]}
            for r in conn.execute(
                "SELECT id, sensor FROM slots WHERE sensor_state = 'offline' ORDER BY lot, fill_order"
            )
        ]
        doc["battery_low"] = [
            {"slot": r[0], "sensor": r[1]}
            for r in conn.execute(
                "SELECT id, sensor FROM slots WHERE battery_alerted IS NOT NULL ORDER BY lot, fill_order"
            )
        ]
        doc["unregistered"] = [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM slots t WHERE sensor_state = 'occupied'"
                " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.slot = t.id AND s.state = 'active')"
                " ORDER BY lot, fill_order"
            )
        ]
        doc["sessions_roaming"] = int(
            conn.execute("SELECT COUNT(*) FROM sessions WHERE state = 'active' AND slot IS NULL").fetchone()[0]
        )
        doc["outbox"] = _outbox(conn, time.time() if now is None else now)
        doc["sessions_active"] = int(conn.execute("SELECT COUNT(*) FROM sessions WHERE state = 'active'").fetchone()[0])
        doc["gates"] = _gates(conn, time.time() if now is None else now)
        doc["rejections"] = [
            {"at": r[0], "source": r[1], "reason": r[2], "detail": r[3]}
            for r in conn.execute("SELECT at, source, reason, detail FROM rejections ORDER BY id DESC LIMIT 10")
        ]
    finally:
        conn.execute("COMMIT")
    return doc


def _outbox(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """The backlog waiting for upstream (without upstream: the last week of events), and its oldest entry."""
    n, size = conn.execute("SELECT rows, bytes FROM outbox_size").fetchone()
    oldest = conn.execute("SELECT created_at FROM outbox ORDER BY seq LIMIT 1").fetchone()
    compacted = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(json_extract(body, '$.count')), 0) FROM outbox WHERE type = 'compacted'"
    ).fetchone()
    return {
        "backlog": int(n),
        "bytes": int(size),
        "oldest_at": iso_ms(oldest[0]) if oldest else None,
        "oldest_age_s": round(max(0.0, now - oldest[0]), 1) if oldest else None,
        "compacted": {"entries": int(compacted[0]), "events": int(compacted[1])},
    }


def _gates(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Each barrier gate as its lane last wrote it (on change, never per STATUS): an online gate heard a STATUS
    within 3 s as of then; an offline one shows how long ago it was last heard."""
    out = []
    for row in conn.execute(
        "SELECT g.id, g.mode, g.barrier, g.reported_mode, g.loops, g.online, g.heard_at, g.changed_at, g.faults,"
        " g.last_fault, g.last_fault_at, (SELECT COUNT(*) FROM gate_actions a WHERE a.gate = g.id),"
        " (SELECT COUNT(*) FROM sessions s WHERE s.entry_gate = g.id AND s.state = 'active'"
        " AND s.confirmed_at IS NULL) FROM gates g ORDER BY g.id"
    ):
        loops = row[4]
        out.append(
            {
                "gate": row[0],
                "mode": row[1],
                "barrier": row[2] or "unknown",
                "reported_mode": row[3],
                "loop_a": None if loops is None else bool(loops & 1),
                "loop_b": None if loops is None else bool(loops & 2),
                "online": bool(row[5]),
                "last_status_at": iso_ms(row[6]) if row[6] is not None else None,
                "last_status_age_s": round(max(0.0, now - row[6]), 1) if row[6] is not None else None,
                "changed_at": iso_ms(row[7]) if row[7] is not None else None,
                "faults": int(row[8]),
                "last_fault": row[9],
                "last_fault_at": iso_ms(row[10]) if row[10] is not None else None,
                "opens_pending": int(row[11]),
                "entries_waiting": int(row[12]),
            }
        )
    return out


def _gate_line(g: dict[str, Any]) -> str:
    loops = "?" if g["loop_a"] is None else ("A" if g["loop_a"] else "-") + ("B" if g["loop_b"] else "-")
    line = f"gate {g['gate']}: barrier {g['barrier']}, mode {g['mode']}, loops {loops}, "
    if g["online"]:
        line += "online"
    elif g["last_status_age_s"] is not None:
        line += f"offline, last STATUS {_age(g['last_status_age_s'])} ago"
    else:
        line += "never heard"
    line += f", {g['faults']} faults"
    if g["last_fault"]:
        line += f" (last {g['last_fault_at']}: {g['last_fault']})"
    if g["opens_pending"]:
        line += f", {g['opens_pending']} OPEN pending"
    if g["entries_waiting"]:
        line += f", {g['entries_waiting']} entries waiting for their pass"
    return line


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} days"


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
        lines.append("  sensors: " + ", ".join(f"{k} {v}" for k, v in lot["sensors"].items()))
    sensors = ", ".join(f"{k} {v}" for k, v in sorted(doc["sensors"].items()))
    lines.append(f"sensors: {sensors}")
    for key, title in (("sensors_offline", "offline sensors"), ("battery_low", "low batteries")):
        if doc[key]:
            lines.append(f"{title}: " + ", ".join(f"{x['slot']} ({x['sensor']})" for x in doc[key][:20]))
    if doc["unregistered"]:
        lines.append("occupied without a session: " + ", ".join(doc["unregistered"][:20]))
    lines.append(f"active sessions: {doc['sessions_active']} ({doc['sessions_roaming']} without a slot)")
    lines.extend(_gate_line(g) for g in doc["gates"])
    box = doc["outbox"]
    line = f"outbox: {box['backlog']} entries, {box['bytes']} bytes"
    if box["oldest_age_s"] is not None:
        line += f", oldest {_age(box['oldest_age_s'])} old ({box['oldest_at']})"
    if box["compacted"]["events"]:
        line += f"; {box['compacted']['events']} superseded slot states compacted"
    lines.append(line)
    if doc["rejections"]:
        lines.append(f"last rejection: {doc['rejections'][0]['source']}: {doc['rejections'][0]['reason']}")
    return "\n".join(lines)
