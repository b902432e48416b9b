"""The outbox bound (contract §7, issue 10 done-means 4): with upstream away and a small bound, compaction keeps
every session event and the latest state per slot, says what it removed (tombstones), loses nothing else, and
the alert fires; when upstream comes back it receives a gapless stream."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.domain import Block, CompactOutbox, Unblock
from gateway.core.events import SessionStarted, SlotStatus
from gateway.core.outbox import account, compact
from gateway.core.plates import PlateKey
from gateway.core.txn import Txn
from gateway.store.audit import audit
from gateway.store.schema import connect, migrate
from gateway.store.settings import settings_from_config
from tests.conftest import MosquittoProcess
from tests.upstream_rig import Rig, rig, subscriber, upstream_config

SETTINGS = settings_from_config(upstream_config(Path("/nonexistent"), "host = 'h'"))


def _store() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.row_factory = sqlite3.Row
    migrate(conn)
    return conn


def _outbox(conn: sqlite3.Connection) -> list[tuple[int, str, dict[str, object]]]:
    return [(r[0], r[1], json.loads(r[2])) for r in conn.execute("SELECT seq, type, body FROM outbox ORDER BY seq")]


# Each event: a slot's state (slot 0..3) or something that is never compacted (None).
events = st.lists(st.one_of(st.integers(0, 3), st.none()), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(
    first=events,
    second=events,
    bound=st.integers(0, 20_000),
    after=st.integers(0, 10),
    scan=st.integers(1, 100),
)
def test_compaction_keeps_the_latest_state_per_slot_and_covers_every_seq(
    first: list[int | None], second: list[int | None], bound: int, after: int, scan: int
) -> None:
    conn = _store()
    txn = Txn(conn, SETTINGS, PlateKey(b"k" * 32), 1_800_000_000.0, 1)
    kept_always: set[int] = set()

    def emit(batch: list[int | None]) -> None:
        conn.execute("BEGIN")
        txn.events.clear()
        for item in batch:
            if item is None:
                kept_always.add(txn.next_seq)
                txn.emit(SessionStarted("s", "lot1", "A", None, "v", None, None))
            else:
                txn.emit(SlotStatus(f"A-{item}", "lot1", "A", "occupied", "none", "x"))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(txn.next_seq),))
        account(conn, len(txn.events), sum(len(e.body) for e in txn.events))  # as the writer does
        conn.execute("COMMIT")

    def compact_all() -> None:
        cursor = after
        for _ in range(1000):
            conn.execute("BEGIN")
            done = compact(txn, CompactOutbox(bound, after_seq=cursor, scan=scan))
            conn.execute("COMMIT")
            if done["exhausted"] or done["bytes"] <= bound * 0.9:
                return
            cursor = done["next_after"]

    emit(first)
    before = {seq: body for seq, _, body in _outbox(conn)}
    compact_all()
    emit(second)  # later states supersede compacted runs' neighbours: a second pass merges into tombstones
    before.update({seq: body for seq, _, body in _outbox(conn) if seq not in before})
    compact_all()

    assert audit(conn) == []  # one gapless range, tombstones included
    rows = _outbox(conn)
    present = {seq for seq, type_, _ in rows if type_ != "compacted"}
    assert kept_always <= present  # session events are never dropped
    assert {s for s in before if s <= after} <= present  # what may be on its way upstream is left alone
    latest: dict[str, int] = {}
    for seq, body in sorted(before.items()):
        if body["type"] == "slot.status":
            latest[str(body["slot"])] = seq
    assert set(latest.values()) <= present  # every slot's latest state is kept
    for seq, type_, body in rows:
        if type_ == "compacted":
            covered = range(seq, int(body["to_seq"]) + 1)  # type: ignore[call-overload]
            assert len(covered) == body["count"]
            # a tombstone only ever stands for superseded slot states
            assert all(before[s]["type"] == "slot.status" and s not in latest.values() for s in covered)
        else:
            assert before[seq]["event_id"] == body["event_id"]  # kept rows are untouched


async def _blocks(r: Rig, n: int, first: int, slots: int = 10) -> None:
    """n slot.status events without alerts: block, unblock, ... round robin over `slots` slots from `first`."""
    for i in range(n):
        slot = f"A-{first + i % slots:03d}"
        cmd = Block(slot=slot, reason="maintenance") if (i // slots) % 2 == 0 else Unblock(slot=slot)
        reply = await r.writer.submit(cmd)
        assert reply.ok, reply


async def test_past_the_bound_superseded_states_are_compacted_and_nothing_else(tmp_path: Path) -> None:
    broker = MosquittoProcess(tmp_path)  # upstream, not started yet: an outage from the first event
    cfg = upstream_config(
        tmp_path / "gw", f"host = '127.0.0.1'\nport = {broker.port}\noutbox_max_bytes = 1048576", slots=40
    )
    async with rig(cfg) as r:
        sessions: list[str] = []
        for _ in range(10):
            sessions += await r.visits(5)
            # four clients on ten slots each: 800 block/unblock per round, about 170 KB of slot.status events
            await asyncio.gather(*(_blocks(r, 200, 1 + 10 * k) for k in range(4)))
        n = r.committed()
        fw = r.upstream.forwarder
        await until(lambda: fw.compactions > 0 and not _over(r), timeout=20)
        conn = connect(r.db, readonly=True)
        try:
            assert audit(conn) == []
            rows = [(s, t, json.loads(b)) for s, t, b in conn.execute("SELECT seq, type, body FROM outbox")]
            size = conn.execute("SELECT bytes FROM outbox_size").fetchone()[0]
        finally:
            conn.close()
        assert size <= 1_048_576
        types = [t for _, t, _ in rows]
        assert types.count("compacted") > 0
        assert types.count("session.started") == types.count("session.ended") == 50
        assert {b["session_id"] for _, t, b in rows if t == "session.started"} == set(sessions)
        alerts = [b for _, t, b in rows if t == "alert"]
        assert [a["code"] for a in alerts] == ["outbox.full"]  # once for the outage, however many passes
        # the latest state of each of the 40 slots is still there
        latest = {b["slot"]: b for _, t, b in rows if t == "slot.status"}
        assert len(latest) == 40
        # each slot blocked and unblocked 100 times: available again
        assert all(b["status"] == "available" and b["reason"] == "unblocked" for b in latest.values())

        # Upstream comes back: the stream is gapless once each tombstone stands for its range.
        broker.start()
        try:
            async with subscriber([("127.0.0.1", broker.port)]) as sub:
                total = r.committed()
                await sub.until_seqs(total, timeout=30)
                assert sub.distinct() == list(range(1, total + 1))
                got = [e for e in sub.events if e["type"] == "alert" and e["code"] == "outbox.compacted"]
                assert got and all(e["severity"] == "info" for e in got)
                full = [e for e in sub.events if e["type"] == "alert" and e["code"] == "outbox.full"]
                assert len({e["event_id"] for e in full}) == 1
                assert total == n  # compaction added the one alert, during the rounds
        finally:
            broker.stop()


def _over(r: Rig) -> bool:
    conn = connect(r.db, readonly=True)
    try:
        return int(conn.execute("SELECT bytes FROM outbox_size").fetchone()[0]) > 1_048_576
    finally:
        conn.close()


async def until(check: object, timeout: float) -> None:
    assert callable(check)
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 (the store is written by the code under test)
            await asyncio.sleep(0.05)


async def test_when_nothing_is_left_to_compact_a_critical_alert_says_the_bound_is_exceeded(tmp_path: Path) -> None:
    cfg = upstream_config(tmp_path, "host = '127.0.0.1'\nport = 1\noutbox_max_bytes = 1048576", slots=20)
    async with rig(cfg) as r:
        for _ in range(20):  # sessions only: about 1.2 MB of events that are never compacted
            await asyncio.gather(*(r.visits(25) for _ in range(4)))
        await until(lambda: r.upstream.forwarder.compactions > 0, timeout=20)
        await asyncio.sleep(0.3)
        conn = connect(r.db, readonly=True)
        try:
            codes = [json.loads(b)["code"] for (b,) in conn.execute("SELECT body FROM outbox WHERE type = 'alert'")]
            started = conn.execute("SELECT COUNT(*) FROM outbox WHERE type = 'session.started'").fetchone()[0]
        finally:
            conn.close()
        assert codes == ["outbox.full", "outbox.over_bound"]
        assert started == 2000
