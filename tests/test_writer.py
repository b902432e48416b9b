"""The writer against a real SQLite store: entry, exit, block, idempotency, events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.core.clock import ManualClock
from gateway.core.domain import Block, Enter, Exit, Reply, Unblock
from gateway.store.audit import audit
from gateway.store.availability import availability
from gateway.store.writer import Committed, Writer, WriterClosed
from tests.helpers import lot_config, new_writer, reader


@pytest.fixture
async def run_writer(tmp_path: Path) -> AsyncIterator[Any]:
    tasks: list[asyncio.Task[None]] = []

    async def start(**kw: Any) -> Writer:
        cfg = lot_config(tmp_path / f"s{len(tasks)}", **kw)
        w = new_writer(cfg)
        tasks.append(asyncio.create_task(w.run()))
        await w.wait_ready()
        w.cfg = cfg  # type: ignore[attr-defined]
        return w

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def outbox(w: Writer) -> list[dict[str, Any]]:
    conn = reader(w.cfg)  # type: ignore[attr-defined]
    try:
        return [json.loads(r[0]) for r in conn.execute("SELECT body FROM outbox ORDER BY seq")]
    finally:
        conn.close()


async def test_enter_exit_round_trip(run_writer: Any) -> None:
    w = await run_writer(slots=3)
    r = await w.submit(Enter(vehicle="ab 123-cd", lot="lot1"))
    assert r.ok and r.data["slot"] == "A-001"
    r2 = await w.submit(Enter(vehicle="EF456GH", lot="lot1"))
    assert r2.data["slot"] == "A-002"
    out = await w.submit(Exit(vehicle="AB123CD"))
    assert out.ok and out.data["session_id"] == r.data["session_id"] and out.data["slot"] == "A-001"
    types = [e["type"] for e in outbox(w)]
    assert types == [
        "session.started",
        "session.confirmed",
        "slot.status",
        "session.started",
        "session.confirmed",
        "slot.status",
        "session.ended",
        "slot.status",
    ]
    assert [e["seq"] for e in outbox(w)] == list(range(1, 9))
    started = outbox(w)[0]
    assert started["vehicle"].startswith("v-") and "AB123CD" not in json.dumps(started)
    conn = reader(w.cfg)
    assert audit(conn) == []
    doc = availability(conn, "lot1")
    assert (doc["total"], doc["available"], doc["occupied"]) == (3, 2, 1)


async def test_full_and_anti_passback(run_writer: Any) -> None:
    w = await run_writer(slots=1)
    assert (await w.submit(Enter(vehicle="AAA111", lot="lot1"))).ok
    again = await w.submit(Enter(vehicle="AAA111", lot="lot1"))
    assert again.code == "already_active"
    full = await w.submit(Enter(vehicle="BBB222", lot="lot1"))
    assert full.code == "full"
    denied = [e for e in outbox(w) if e["type"] == "entry.denied"]
    assert [e["reason"] for e in denied] == ["already_active", "full"]


async def test_soft_anti_passback_returns_existing(run_writer: Any) -> None:
    w = await run_writer(slots=2, anti_passback="soft")
    first = await w.submit(Enter(vehicle="AAA111", lot="lot1"))
    second = await w.submit(Enter(vehicle="AAA111", lot="lot1"))
    assert second.ok and second.data["session_id"] == first.data["session_id"]
    assert any(e["type"] == "alert" for e in outbox(w))


async def test_denylist(run_writer: Any) -> None:
    w = await run_writer()
    r = await w.submit(Enter(vehicle="xx 999 xx", lot="lot1"))
    assert r.code == "denied"


async def test_restricted_types_need_permit_or_request(run_writer: Any) -> None:
    w = await run_writer(
        slots=1,
        extra_slots=', { ids = "A-900", type = "accessible" }',
        permits='{ vehicle = "PERMIT1", types = ["accessible"] }',
    )
    assert (await w.submit(Enter(vehicle="AAA111", lot="lot1"))).data["slot"] == "A-001"
    # The only free slot is restricted: a plain entry is full, a permit holder gets it.
    assert (await w.submit(Enter(vehicle="BBB222", lot="lot1"))).code == "full"
    assert (await w.submit(Enter(vehicle="PERMIT1", lot="lot1"))).data["slot"] == "A-900"


async def test_idempotent_transaction(run_writer: Any) -> None:
    w = await run_writer(slots=5)
    a = await w.submit(Enter(vehicle="AAA111", lot="lot1", idempotency_key="tx:1"))
    b = await w.submit(Enter(vehicle="AAA111", lot="lot1", idempotency_key="tx:1"))
    assert a == b
    assert sum(e["type"] == "session.started" for e in outbox(w)) == 1


async def test_block_unblock_and_block_once_free(run_writer: Any) -> None:
    w = await run_writer(slots=2)
    r = await w.submit(Enter(vehicle="AAA111", lot="lot1"))
    assert (await w.submit(Block(slot=r.data["slot"], reason="paint"))).ok
    assert (await w.submit(Block(slot="A-002", reason="paint"))).ok
    assert (await w.submit(Enter(vehicle="BBB222", lot="lot1"))).code == "full"
    await w.submit(Exit(vehicle="AAA111"))
    conn = reader(w.cfg)
    assert availability(conn, "lot1")["blocked"] == 2
    await w.submit(Unblock(slot="A-002"))
    assert (await w.submit(Enter(vehicle="BBB222", lot="lot1"))).data["slot"] == "A-002"
    assert (await w.submit(Block(slot="nope"))).code == "unknown_slot"
    assert audit(conn) == []


async def test_exit_fuzzy_matching(run_writer: Any) -> None:
    w = await run_writer(slots=5)
    await w.submit(Enter(vehicle="AB123CD", lot="lot1"))
    await w.submit(Enter(vehicle="XY987ZZ", lot="lot1"))
    # confusable: 8 for B, 0 for D is not there; one edit away
    assert (await w.submit(Exit(vehicle="A8123CD"))).ok
    assert (await w.submit(Exit(vehicle="QQ000QQ", gate=None))).code == "unknown_session"
    assert (await w.submit(Exit(vehicle="NOPE", candidates=("XY987ZZ",)))).ok


async def test_failing_command_does_not_undo_neighbours(run_writer: Any) -> None:
    w = await run_writer(slots=3)
    replies = await asyncio.gather(
        w.submit(Enter(vehicle="AAA111", lot="lot1")),
        w.submit(Enter(vehicle="!!!", lot="lot1")),
        w.submit(Enter(vehicle="BBB222", lot="nolot")),
        w.submit(Enter(vehicle="CCC333", lot="lot1")),
    )
    assert [r.ok for r in replies] == [True, False, False, True]
    assert [r.code for r in replies[1:3]] == ["invalid_request", "unknown_lot"]
    seqs = [e["seq"] for e in outbox(w)]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_listeners_see_events_after_commit(run_writer: Any) -> None:
    w = await run_writer(slots=2)
    seen: list[Committed] = []
    w.add_listener(seen.append)
    await w.submit(Enter(vehicle="AAA111", lot="lot1"))
    assert seen[0].events[0].type == "session.started"
    # what the listener saw is on disk already
    assert outbox(w)[0]["event_id"] == seen[0].events[0].event_id


async def test_shutdown_answers_queued_commands(tmp_path: Path) -> None:
    cfg = lot_config(tmp_path)
    w = new_writer(cfg)
    task = asyncio.create_task(w.run())
    await w.wait_ready()
    pending = [asyncio.create_task(w.submit(Enter(vehicle=f"CAR{i}", lot="lot1"))) for i in range(50)]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    replies = [r for r in outcomes if isinstance(r, Reply)]
    # What was not committed says so (WriterClosed), so that nobody acknowledges it.
    assert all(isinstance(r, WriterClosed) for r in outcomes if not isinstance(r, Reply))
    assert all(r.ok or r.code == "full" for r in replies)
    # Every ok reply is committed: the restarted store holds exactly those sessions.
    conn = reader(cfg)
    n = conn.execute("SELECT COUNT(*) FROM sessions WHERE state='active'").fetchone()[0]
    assert n == sum(r.ok for r in replies)
    assert audit(conn) == []


async def test_slot_removal_with_active_session_is_refused(tmp_path: Path) -> None:
    from gateway.store.schema import StoreError

    cfg = lot_config(tmp_path, slots=3)
    w = new_writer(cfg)
    task = asyncio.create_task(w.run())
    await w.wait_ready()
    r = await w.submit(Enter(vehicle="AAA111", lot="lot1"))
    await w.submit(Enter(vehicle="BBB222", lot="lot1"))
    await w.submit(Enter(vehicle="CCC333", lot="lot1"))
    await w.submit(Exit(vehicle="CCC333"))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert r.data["slot"] == "A-001"
    smaller = lot_config(tmp_path, slots=2)  # drops A-003, which is free: fine
    w2 = new_writer(smaller)
    t2 = asyncio.create_task(w2.run())
    await w2.wait_ready()
    t2.cancel()
    await asyncio.gather(t2, return_exceptions=True)
    bigger = lot_config(tmp_path, slots=20)  # adding works
    w3 = new_writer(bigger)
    t3 = asyncio.create_task(w3.run())
    await w3.wait_ready()
    t3.cancel()
    await asyncio.gather(t3, return_exceptions=True)
    one = lot_config(tmp_path, slots=1)  # drops A-002, which holds BBB222's session
    w4 = new_writer(one)
    with pytest.raises(StoreError, match="A-002"):
        await w4.run()


async def test_housekeeping_expires_keys_erases_plates_and_trims_local_outbox(tmp_path: Path) -> None:
    from gateway.core.domain import Housekeeping

    clock = ManualClock(wall=1_000_000.0)
    cfg = lot_config(tmp_path, slots=3)
    w = new_writer(cfg, clock=clock)
    task = asyncio.create_task(w.run())
    await w.wait_ready()
    try:
        first = await w.submit(Enter(vehicle="AAA111", lot="lot1", idempotency_key="tx:a"))
        await w.submit(Exit(vehicle="AAA111"))
        clock.advance(40 * 86400)  # past the idempotency TTL, the 30-day retention and the local event week
        await w.submit(Enter(vehicle="BBB222", lot="lot1"))
        done = await w.submit(Housekeeping())
        assert done.data == {"idempotency_expired": 1, "plates_erased": 1, "outbox_trimmed": 5}
        again = await w.submit(Enter(vehicle="AAA111", lot="lot1", idempotency_key="tx:a"))
        assert again.ok and again.data["session_id"] != first.data["session_id"]  # the key had expired
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    conn = reader(cfg)
    assert conn.execute("SELECT plate FROM sessions WHERE id = ?", (first.data["session_id"],)).fetchone()[0] is None
    assert audit(conn) == []


async def test_a_full_disk_is_retried_and_a_request_gives_up_after_its_patience(tmp_path: Path) -> None:
    from gateway.core.domain import RecordRejections

    clock = ManualClock()
    cfg = lot_config(tmp_path / "s")
    w = new_writer(cfg, clock)
    task = asyncio.create_task(w.run())
    await w.wait_ready()
    loop = asyncio.get_running_loop()

    def on_writer_conn(sql: str) -> None:
        # A full disk for the writer's connection only: its own page limit (the writer thread owns it).
        assert w._conn is not None
        w._conn.execute(sql)

    async def failures_reach(n: int) -> None:
        for _ in range(1000):  # the attempts run in the writer thread, in real time
            if w.commit_failures >= n:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(f"{w.commit_failures} failed commits, not {n}")

    try:
        await loop.run_in_executor(w._executor, on_writer_conn, "PRAGMA max_page_count = 1")  # = the file's size
        big = RecordRejections(items=tuple((0.0, f"src{i}", "bad", "x" * 200) for i in range(200)))
        rejections = asyncio.create_task(w.submit(big))
        request = asyncio.create_task(
            w.submit(Enter(vehicle="AB1", lot="lot1", idempotency_key="tx:1"), give_up_after=10)
        )
        await failures_reach(1)
        clock.advance(5)
        await failures_reach(2)
        assert not request.done() and not rejections.done()  # failing for 5 s: both wait
        clock.advance(6)
        await failures_reach(3)
        assert (await request).code == "unavailable"  # failing for 11 s: the request gives up
        assert not rejections.done()  # device input and upkeep wait for the store
        await loop.run_in_executor(w._executor, on_writer_conn, "PRAGMA max_page_count = 1073741823")  # freed
        clock.advance(3)
        assert (await asyncio.wait_for(rejections, 10)).ok
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    conn = reader(cfg)
    assert conn.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 200
    assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0  # given up: never committed


async def test_new_slots_are_available_since_the_gateways_clock_not_the_machines(tmp_path: Path) -> None:
    clock = ManualClock(wall=1_000_000.0)  # 1970: far from any machine's time.time()
    cfg = lot_config(tmp_path, slots=2)
    w = new_writer(cfg, clock=clock)
    task = asyncio.create_task(w.run())
    await w.wait_ready()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    conn = reader(cfg)
    assert {since for (since,) in conn.execute("SELECT since FROM slots")} == {1_000_000.0}
