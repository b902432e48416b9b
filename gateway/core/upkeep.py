"""The writer's own chores: the rejection log, alerts from outside the core, and housekeeping."""

from __future__ import annotations

from typing import Any

from gateway.core import outbox
from gateway.core.domain import Housekeeping, Ping, RaiseAlert, RecordRejections
from gateway.core.txn import Txn

LOCAL_EVENTS_KEPT_S = 7 * 86400.0


def record_rejections(txn: Txn, cmd: RecordRejections) -> dict[str, Any]:
    txn.conn.executemany("INSERT INTO rejections (at, source, reason, detail) VALUES (?, ?, ?, ?)", cmd.items)
    return {}


def raise_alert(txn: Txn, cmd: RaiseAlert) -> dict[str, Any]:
    txn.alert(cmd.code, cmd.severity, cmd.subject, cmd.message)
    return {}


def housekeeping(txn: Txn, _cmd: Housekeeping) -> dict[str, Any]:
    s = txn.settings
    gone = txn.conn.execute(
        "DELETE FROM idempotency WHERE created_at < ?", (txn.now - max(s.idempotency_ttl, s.reread_window),)
    ).rowcount
    txn.conn.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?", (s.rejections_kept,))
    erased = txn.conn.execute(
        "UPDATE sessions SET plate = NULL WHERE state != 'active' AND ended_at < ? AND plate IS NOT NULL",
        (txn.now - s.retention_s,),
    ).rowcount
    # Closed reservations and recorded payments answer their repeats for as long as ended sessions keep plates.
    erased += txn.conn.execute(
        "DELETE FROM reservations WHERE state NOT IN ('booked', 'held') AND closed_at < ?", (txn.now - s.retention_s,)
    ).rowcount
    txn.conn.execute("DELETE FROM payments WHERE at < ?", (txn.now - max(s.retention_s, s.idempotency_ttl),))
    trimmed = 0
    if not s.has_upstream:
        # Nobody forwards and deletes: keep a week of events for `status` and late subscribers, drop the oldest.
        # Deleting a prefix keeps the remaining seq range contiguous.
        trimmed = outbox.delete(txn.conn, "created_at < ?", (txn.now - LOCAL_EVENTS_KEPT_S,))
    return {"idempotency_expired": gone, "plates_erased": erased, "outbox_trimmed": trimmed}


def ping(txn: Txn, cmd: Ping) -> dict[str, Any]:
    """Nothing: the writer got this far (gateway/services/systemd.py)."""
    return {}
