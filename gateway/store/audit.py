"""Read-only checks of the store's invariants (contract §8, guarantees 1 and 2, and the event sequence)."""

from __future__ import annotations

import sqlite3

from gateway.core.reconcile import OFFLINE, RESEATED, VACATE
from gateway.core.slots import derive_status

FENCES = ("sessions_one_per_slot", "sessions_one_per_vehicle")


def audit(conn: sqlite3.Connection) -> list[str]:
    """Every violation as one line; empty when all invariants hold. Reads one consistent snapshot."""
    problems: list[str] = []
    conn.execute("BEGIN")
    try:
        for slot, n, ids in conn.execute(
            "SELECT slot, COUNT(*), GROUP_CONCAT(id, ', ') FROM sessions"
            " WHERE state = 'active' AND slot IS NOT NULL GROUP BY slot HAVING COUNT(*) > 1 ORDER BY slot"
        ):
            problems.append(f"slot {slot}: {n} active sessions ({ids})")
        for lot, vehicle, n, ids in conn.execute(
            "SELECT lot, vehicle, COUNT(*), GROUP_CONCAT(id, ', ') FROM sessions"
            " WHERE state = 'active' GROUP BY lot, vehicle HAVING COUNT(*) > 1 ORDER BY lot, vehicle"
        ):
            problems.append(f"lot {lot}: vehicle {vehicle} has {n} active sessions ({ids})")
        for sid, slot, lot in conn.execute(
            "SELECT s.id, s.slot, s.lot FROM sessions s LEFT JOIN slots t ON t.id = s.slot"
            " WHERE s.state = 'active' AND s.slot IS NOT NULL AND (t.id IS NULL OR t.lot != s.lot)"
        ):
            problems.append(f"session {sid}: slot {slot} is not a slot of lot {lot}")
        for slot, stored, blocked, sensor, has_session, held in conn.execute(
            "SELECT t.id, t.status, t.blocked, t.sensor_state,"
            " EXISTS (SELECT 1 FROM sessions s WHERE s.slot = t.id AND s.state = 'active'),"
            " EXISTS (SELECT 1 FROM reservations r WHERE r.slot = t.id AND r.state = 'held')"
            " FROM slots t ORDER BY t.id"
        ):
            implied = derive_status(bool(has_session), bool(blocked), sensor, bool(held))
            if implied != stored:
                problems.append(f"slot {slot}: status is {stored!r} but the store implies {implied!r}")
        for lot, kept_total, kept_occupied, total, occupied in conn.execute(
            "SELECT l.id, l.total, l.occupied, COUNT(t.id), COALESCE(SUM(t.status = 'occupied'), 0)"
            " FROM lots l LEFT JOIN slots t ON t.lot = l.id GROUP BY l.id ORDER BY l.id"
        ):
            if (kept_total, kept_occupied) != (total, occupied):
                problems.append(
                    f"lot {lot}: kept counts {kept_occupied}/{kept_total} occupied but the slots say {occupied}/{total}"
                )
        for slot, a, b in conn.execute(
            "SELECT r.slot, r.id, q.id FROM reservations r JOIN reservations q"
            " ON q.slot = r.slot AND q.id > r.id AND q.start_at < r.end_at AND r.start_at < q.end_at"
            " WHERE r.state IN ('booked', 'held') AND q.state IN ('booked', 'held') ORDER BY r.slot"
        ):
            problems.append(f"slot {slot}: reservations {a} and {b} overlap")
        for rid, slot, lot in conn.execute(
            "SELECT r.id, r.slot, r.lot FROM reservations r LEFT JOIN slots t ON t.id = r.slot"
            " WHERE r.state IN ('booked', 'held') AND (t.id IS NULL OR t.lot != r.lot)"
        ):
            problems.append(f"reservation {rid}: slot {slot} is not a slot of lot {lot}")
        problems.extend(_check_deadlines(conn))
        for sid, gate in conn.execute(
            "SELECT s.id, s.entry_gate FROM sessions s JOIN gates g ON g.id = s.entry_gate"
            " WHERE s.state = 'active' AND s.confirmed_at IS NULL AND NOT EXISTS"
            " (SELECT 1 FROM deadlines d WHERE d.kind = 'lane.pass_timeout' AND d.subject = s.id)"
        ):
            problems.append(
                f"session {sid}: waits for its pass at gate {gate} with no pass timeout (its slot stays held)"
            )
        problems.extend(_check_seq(conn))
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        for fence in FENCES:
            if fence not in present:
                problems.append(f"store: fence index {fence} is missing")
    finally:
        conn.execute("COMMIT")
    return problems


def _check_deadlines(conn: sqlite3.Connection) -> list[str]:
    """The reconciliation deadlines match the state they count down for (gateway/core/reconcile.py)."""
    out = []
    vacating = (
        "SELECT s.id FROM sessions s JOIN slots t ON t.id = s.slot"
        " WHERE s.state = 'active' AND s.confirmed_timer IS NOT NULL AND t.sensor_state = 'vacant'"
    )
    for (subject,) in conn.execute(
        f"SELECT subject FROM deadlines WHERE kind = ? AND subject NOT IN ({vacating}) ORDER BY subject", (VACATE,)
    ):
        out.append(f"session {subject}: a vacate countdown, but not a confirmed session on a vacant slot")
    for (session,) in conn.execute(
        f"SELECT id FROM ({vacating}) WHERE id NOT IN (SELECT subject FROM deadlines WHERE kind = ?) ORDER BY id",
        (VACATE,),
    ):
        out.append(f"session {session}: its slot is vacant but no vacate countdown runs")
    live = "SELECT sensor FROM slots WHERE sensor_state IN ('vacant', 'occupied')"
    for (subject,) in conn.execute(
        f"SELECT subject FROM deadlines WHERE kind = ? AND subject NOT IN ({live}) ORDER BY subject", (OFFLINE,)
    ):
        out.append(f"sensor {subject}: an offline countdown, but the sensor is not live")
    for (sensor,) in conn.execute(
        f"SELECT sensor FROM ({live}) WHERE sensor NOT IN (SELECT subject FROM deadlines WHERE kind = ?)"
        " ORDER BY sensor",
        (OFFLINE,),
    ):
        out.append(f"sensor {sensor}: live but no offline countdown runs")
    remembered = "SELECT id FROM sessions WHERE state = 'active' AND reseated_from IS NOT NULL"
    for (subject,) in conn.execute(
        f"SELECT subject FROM deadlines WHERE kind = ? AND subject NOT IN ({remembered}) ORDER BY subject",
        (RESEATED,),
    ):
        out.append(f"session {subject}: a re-seat countdown, but no active session re-seated away from a slot")
    for (session,) in conn.execute(
        f"SELECT id FROM ({remembered}) WHERE id NOT IN (SELECT subject FROM deadlines WHERE kind = ?) ORDER BY id",
        (RESEATED,),
    ):
        out.append(f"session {session}: re-seated away from a slot but no countdown ends it")
    for sid, slot in conn.execute(
        "SELECT s.id, s.slot FROM sessions s JOIN slots t ON t.id = s.slot"
        " WHERE s.state = 'active' AND s.seated_at IS NULL AND t.sensor_state = 'occupied' ORDER BY s.id"
    ):
        out.append(f"session {sid}: slot {slot} reports its car, but the session is not seated")
    for (sid,) in conn.execute(
        "SELECT id FROM sessions WHERE state = 'active' AND unseen_at IS NOT NULL"
        " AND (slot IS NULL OR seated_at IS NOT NULL) ORDER BY id"
    ):
        out.append(f"session {sid}: placed unseen, but it has no slot or has been seen since")
    return out


def _check_seq(conn: sqlite3.Connection) -> list[str]:
    """The outbox covers one gapless seq range ending at the last seq assigned. Entries acknowledged upstream
    are deleted from the front; a compaction tombstone (type `compacted`) stands for its range up to `to_seq`.
    Any other hole is a lost event."""
    next_seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
    end = "CASE WHEN type = 'compacted' THEN json_extract(body, '$.to_seq') ELSE seq END"
    out = []
    breaks = conn.execute(
        f"SELECT seq, prev_end FROM (SELECT seq, MAX({end}) OVER"
        " (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end FROM outbox)"
        " WHERE prev_end IS NOT NULL AND seq != prev_end + 1 ORDER BY seq LIMIT 11"
    ).fetchall()
    for seq, prev_end in breaks[:10]:
        if seq > prev_end + 1:
            out.append(f"outbox: seq {prev_end + 1}..{seq - 1} missing (no compaction tombstone covers them)")
        else:
            out.append(f"outbox: seq {seq} lies inside the compaction tombstone ending at {prev_end}")
    if len(breaks) > 10:
        out.append("outbox: more breaks in the seq range not shown")
    last = conn.execute(f"SELECT MAX({end}) FROM outbox").fetchone()
    if last[0] is not None and last[0] != next_seq - 1:
        out.append(f"outbox: last seq {last[0]} but the next to assign is {next_seq}")
    kept = conn.execute("SELECT rows, bytes FROM outbox_size").fetchone()
    real = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox").fetchone()
    if tuple(kept) != tuple(real):
        out.append(f"outbox: its size is kept as {kept[0]} entries, {kept[1]} bytes but is {real[0]}, {real[1]}")
    return out
