"""The outbox as upstream sees it: forgetting what reached upstream, and compaction past the bound.

Compaction removes only superseded `slot.status` events: those with a later `slot.status` of the same slot
still in the outbox (the slot's latest state always stays). Each run of removed events becomes one
tombstone row (type `compacted`, at the run's first seq, body `{"to_seq", "count"}`); a tombstone next to
another removed event grows and adjacent tombstones merge, so the rows left still cover every seq. Upstream
receives a tombstone as an `alert` with code `outbox.compacted` in the run's place (see `tombstone_event`):
the stream stays gapless, and a consumer tells compaction from loss by it.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.core.clock import iso_ms
from gateway.core.domain import CompactOutbox, ForgetEvents
from gateway.core.txn import Txn

TOMBSTONE = "compacted"
# Compact down to this share of the bound, so compaction runs now and then instead of after every commit.
TARGET = 0.9


def account(conn: sqlite3.Connection, rows: int, size_: int) -> None:
    """Entries and body bytes added to the outbox (negative: removed). Whoever writes to the outbox calls this
    in the same transaction: the writer for the events of each commit, the deleters for what they delete."""
    if rows or size_:
        conn.execute("UPDATE outbox_size SET rows = rows + ?, bytes = bytes + ?", (rows, size_))


def delete(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> int:
    """DELETE FROM outbox WHERE `where`, accounted; returns how many entries went."""
    lengths = conn.execute(f"DELETE FROM outbox WHERE {where} RETURNING LENGTH(body)", args).fetchall()
    account(conn, -len(lengths), -sum(n for (n,) in lengths))
    return len(lengths)


def forget(txn: Txn, cmd: ForgetEvents) -> dict[str, Any]:
    return {"deleted": delete(txn.conn, "seq <= ?", (cmd.upto,))}


def size(txn: Txn) -> tuple[int, int]:
    """(entries, body bytes) of the outbox."""
    rows, size_ = txn.conn.execute("SELECT rows, bytes FROM outbox_size").fetchone()
    return int(rows), int(size_)


@dataclass(slots=True)
class _Run:
    """Consecutive entries being folded into one tombstone at `lo`."""

    lo: int
    hi: int
    count: int
    created_at: float
    # the tombstone already at `lo` that this run extends, if any (its row is updated, not re-inserted)
    existing: bool
    # whether anything was folded in beyond that existing tombstone
    grown: bool


def compact(txn: Txn, cmd: CompactOutbox) -> dict[str, Any]:
    """One bounded pass of compaction (see the module docstring); returns what it did and where it stopped."""
    conn = txn.conn
    _, before = size(txn)
    target = int(cmd.max_bytes * TARGET)
    if before <= target:
        return {"bytes": before, "removed": 0, "next_after": cmd.after_seq, "exhausted": False}
    if cmd.announce:
        txn.alert(
            "outbox.full",
            "warning",
            {"outbox_bytes": before, "max_bytes": cmd.max_bytes},
            f"the outbox reached its bound of {cmd.max_bytes} bytes while upstream is unreachable: superseded "
            "slot.status events are being compacted; session, payment, gate and alert events are kept",
        )
    rows = conn.execute(
        "SELECT o.seq, o.type, o.created_at, LENGTH(o.body),"
        " CASE WHEN o.type = ? THEN o.body END,"
        " o.type = 'slot.status' AND EXISTS (SELECT 1 FROM outbox n WHERE n.type = 'slot.status'"
        "   AND json_extract(n.body, '$.slot') = json_extract(o.body, '$.slot') AND n.seq > o.seq)"
        " FROM outbox o WHERE o.seq > ? ORDER BY o.seq LIMIT ?",
        (TOMBSTONE, cmd.after_seq, cmd.scan),
    ).fetchall()
    freed = 0
    removed = 0
    deletes: list[int] = []
    run: _Run | None = None
    last = cmd.after_seq
    for seq, type_, created_at, length, tomb_body, superseded in rows:
        if run is None and before - freed <= target:
            break
        last = seq
        if superseded:
            deletes.append(seq)
            freed += length
            removed += 1
            if run is None:
                run = _Run(seq, seq, 1, created_at, existing=False, grown=True)
            else:
                run.hi, run.count, run.grown = seq, run.count + 1, True
        elif type_ == TOMBSTONE:
            doc = json.loads(tomb_body)
            if run is None:
                run = _Run(seq, doc["to_seq"], doc["count"], created_at, existing=True, grown=False)
            else:
                deletes.append(seq)
                freed += length
                run.hi, run.count, run.grown = doc["to_seq"], run.count + doc["count"], True
        elif run is not None:
            freed -= _close(txn, run, deletes)
            run = None
    if run is not None:
        freed -= _close(txn, run, deletes)
    exhausted = len(rows) < cmd.scan and last == (rows[-1][0] if rows else cmd.after_seq)
    _, after = size(txn)
    return {"bytes": after, "removed": removed, "next_after": last, "exhausted": exhausted}


def _close(txn: Txn, run: _Run, deletes: list[int]) -> int:
    """Write the run's tombstone (after deleting what it replaces); returns the tombstone's bytes."""
    conn = txn.conn
    if run.existing and run.grown:
        deletes.append(run.lo)  # the tombstone at lo is written again, bigger
    for start in range(0, len(deletes), 500):
        chunk = deletes[start : start + 500]
        delete(conn, f"seq IN ({','.join('?' * len(chunk))})", tuple(chunk))
    deletes.clear()
    if run.existing and not run.grown:
        return 0
    body = json.dumps({"to_seq": run.hi, "count": run.count}, separators=(",", ":"))
    # A grown tombstone is a new one for upstream (new event id): a consumer may have seen the smaller one.
    conn.execute(
        "INSERT INTO outbox (seq, event_id, type, created_at, body) VALUES (?, ?, ?, ?, ?)",
        (run.lo, str(uuid.uuid4()), TOMBSTONE, run.created_at, body),
    )
    account(conn, 1, len(body))
    return len(body)


def tombstone_event(gateway: str, seq: int, event_id: str, created_at: float, body: str) -> dict[str, Any]:
    """The `alert` upstream receives in place of a run of compacted events."""
    doc = json.loads(body)
    return {
        "event_id": event_id,
        "seq": seq,
        "ts": iso_ms(created_at),
        "gateway": gateway,
        "type": "alert",
        "code": "outbox.compacted",
        "severity": "info",
        "subject": {"from_seq": seq, "to_seq": doc["to_seq"], "events": doc["count"]},
        "message": f"seq {seq}..{doc['to_seq']}: {doc['count']} superseded slot.status events compacted while "
        "upstream was unreachable; the latest state of every slot is kept",
    }
