"""Lane decisions in the writer without a controller: the priority lane, events applied once, signs, tickets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.core.clock import ManualClock
from gateway.core.domain import Enter, GateEvent, RaiseAlert, Reply
from gateway.core.events import Alert
from gateway.core.lanes import EVENTS_KEPT, TICKET_CHARS, money, new_ticket, sign_text
from gateway.core.plates import normalise
from gateway.core.txn import Txn
from gateway.mqtt.link import Incoming
from gateway.services.ingress import Ingress
from gateway.store.audit import audit
from gateway.store.reads import ReadStore
from gateway.store.schema import db_path
from gateway.store.writer import HANDLERS, Committed, Writer
from simulators import rfc3339
from tests.harness import site_config
from tests.helpers import lot_config, new_writer, reader

GATE = """
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
serial = { port = "/dev/null-gcp1" }
"""


async def test_urgent_commands_commit_first_and_alone(tmp_path: Path) -> None:
    """The priority lane: queued behind 300 commands, a car's decision is in the very next group commit, and that
    commit carries nothing else."""
    cfg = lot_config(tmp_path, extra=GATE)
    writer = new_writer(cfg)
    await writer.start()
    commits: list[Committed] = []
    writer.add_listener(commits.append)
    backlog = [
        asyncio.create_task(writer.submit(RaiseAlert(code="x", severity="info", subject={}, message=str(i))))
        for i in range(300)
    ]
    car = asyncio.create_task(writer.submit(Enter(vehicle="AB123CD", gate="in1"), urgent=True))
    await asyncio.sleep(0)  # all of them queued before the writer takes its first batch
    task = asyncio.create_task(writer.run())
    try:
        assert (await car).ok
        await asyncio.gather(*backlog)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    first = commits[0]
    assert first.batch_size == 1
    assert [e.type for e in first.events] == ["session.started", "slot.status", "gate.opened"]
    assert [a.open for a in first.actions] == [True]
    assert sum(c.batch_size for c in commits) == 301


@dataclass
class CarMidBatch:
    commits: list[Committed]
    backlog: list[asyncio.Task[Reply]]
    car: asyncio.Task[Reply]


@contextlib.asynccontextmanager
async def car_mid_batch(writer: Writer) -> AsyncIterator[CarMidBatch]:
    """`writer` running, applying a batch of 300 alerts held at its first statement until a car's decision is
    submitted (urgent); the batch goes on as the body starts. The writer stops on exit."""
    task = asyncio.create_task(writer.run())
    in_batch, go = threading.Event(), threading.Event()

    def hold_first_alert(sql: str) -> None:
        # In the writer thread: the first alert's statement holds the batch until the car has been submitted.
        if "INSERT" in sql and not in_batch.is_set():
            in_batch.set()
            go.wait()

    loop = asyncio.get_running_loop()
    try:
        await writer.wait_ready()
        assert writer._conn is not None
        await loop.run_in_executor(writer._executor, writer._conn.set_trace_callback, hold_first_alert)
        commits: list[Committed] = []
        writer.add_listener(commits.append)
        backlog = [
            asyncio.create_task(writer.submit(RaiseAlert(code="x", severity="info", subject={}, message=str(i))))
            for i in range(300)
        ]
        await loop.run_in_executor(None, in_batch.wait)  # the writer took all 300 in one batch and applies them
        car = asyncio.create_task(writer.submit(Enter(vehicle="AB123CD", gate="in1"), urgent=True))
        await asyncio.sleep(0)  # the car is in the priority lane
        go.set()
        yield CarMidBatch(commits, backlog, car)
    finally:
        go.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_group_commit_under_way_makes_way_for_a_car(tmp_path: Path) -> None:
    """A car's decision that arrives while the writer applies a batch of 300 commands does not wait for the other
    299, nor for a COMMIT of its own: the batch stops after the command under way, applies the decision and commits
    the two together; the rest follows in its order."""
    writer = new_writer(lot_config(tmp_path, extra=GATE))
    async with car_mid_batch(writer) as run:
        assert (await run.car).ok
        await asyncio.gather(*run.backlog)
    first = run.commits[0]
    assert first.batch_size == 2  # the alert it was applying, then the car
    assert [e.type for e in first.events] == ["alert", "session.started", "slot.status", "gate.opened"]
    assert [a.open for a in first.actions] == [True]
    assert sum(c.batch_size for c in run.commits) == 301
    alerts = [e.event.message for c in run.commits for e in c.events if isinstance(e.event, Alert)]
    assert alerts == [str(i) for i in range(300)]  # committed once each, in the order submitted


async def test_a_car_that_joined_a_failed_commit_commits_once_when_it_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit the car joined fails for a passing reason (a full disk): both are rolled back, and the retry
    commits the car and every alert exactly once, the alerts in the order submitted."""
    cfg = lot_config(tmp_path, extra=GATE)
    clock = ManualClock()
    writer = new_writer(cfg, clock)
    enter = HANDLERS[Enter]
    failed: list[bool] = []

    def full_once(txn: Txn, cmd: Enter) -> dict[str, Any]:
        if not failed:
            failed.append(True)
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = sqlite3.SQLITE_FULL
            raise exc
        return enter(txn, cmd)

    monkeypatch.setitem(HANDLERS, Enter, full_once)
    async with car_mid_batch(writer) as run:
        while writer.commit_failures == 0:  # noqa: ASYNC110 (counted in the writer thread)
            await asyncio.sleep(0.01)
        clock.advance(1.0)  # the retry's backoff
        assert (await asyncio.wait_for(run.car, 10)).ok
        await asyncio.wait_for(asyncio.gather(*run.backlog), 10)
    assert failed == [True] and writer.commit_failures == 1
    # The retried commit is the one the car had joined: the first alert and the car, rolled back and done again.
    first = [e.type for e in run.commits[0].events]
    assert first[0] == "alert" and "gate.opened" in first
    alerts = [e.event.message for c in run.commits for e in c.events if isinstance(e.event, Alert)]
    assert alerts == [str(i) for i in range(300)]
    opened = [a for c in run.commits for a in c.actions if a.open]
    assert len(opened) == 1
    conn = reader(cfg)
    assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 1
    assert audit(conn) == []


async def test_a_camera_read_holds_the_receive_loop_until_its_decision_is_committed(tmp_path: Path) -> None:
    """Ingress.handle returns for a camera read only once its decision is committed, so that the MQTT receive loop
    (which awaits it) handles no sensor message meanwhile to compete with the decision for the CPU."""
    cfg = site_config(tmp_path / "state", port=1, embedded=False)
    writer = new_writer(cfg)
    task = asyncio.create_task(writer.run())
    at_commit, go = threading.Event(), threading.Event()

    def hold_commit(sql: str) -> None:
        if sql == "COMMIT" and not at_commit.is_set():
            at_commit.set()
            go.wait()

    loop = asyncio.get_running_loop()
    try:
        await writer.wait_ready()
        assert writer._conn is not None
        await loop.run_in_executor(writer._executor, writer._conn.set_trace_callback, hold_commit)
        ingress = Ingress(cfg, writer, ReadStore(db_path(cfg.state_path())))
        read = json.dumps({"event_id": "e1", "plate": "AB123CD", "ts": rfc3339(time.time())}).encode()
        handled = asyncio.create_task(ingress.handle(Incoming("cameras/cam-in1/reads", read, qos=1, retain=False)))
        await loop.run_in_executor(None, at_commit.wait)
        await asyncio.sleep(0.05)
        assert not handled.done()  # the decision is not committed yet
        go.set()
        result = await asyncio.wait_for(handled, 5)
        assert result is not None and result.done() and result.result() is True
    finally:
        go.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_car_expected_at_a_barrier_holds_other_commits_back(tmp_path: Path) -> None:
    """After expect_urgent (a car on loop A) the writer starts no other group commit: an alert submitted first
    commits after the car's decision. Without a decision the hold ends after its time."""
    clock = ManualClock()
    cfg = lot_config(tmp_path, extra=GATE)
    writer = new_writer(cfg, clock)
    task = asyncio.create_task(writer.run())
    try:
        await writer.wait_ready()
        commits: list[Committed] = []
        writer.add_listener(commits.append)
        writer.expect_urgent(1.0)
        alert = asyncio.create_task(writer.submit(RaiseAlert(code="x", severity="info", subject={}, message="a")))
        for _ in range(10):  # time enough for the writer to take the alert into a batch, were it free to
            await asyncio.sleep(0)
        assert (await writer.submit(Enter(vehicle="AB123CD", gate="in1"), urgent=True)).ok
        assert (await alert).ok
        assert [bool(c.actions) for c in commits] == [True, False]  # the car first, then the alert

        writer.expect_urgent(1.0)
        late = asyncio.create_task(writer.submit(RaiseAlert(code="x", severity="info", subject={}, message="b")))
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(commits) == 2 and not late.done()
        clock.advance(1.0)  # no decision came: the hold is over
        assert (await asyncio.wait_for(late, 10)).ok
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_gate_event_is_applied_once_by_its_seq(tmp_path: Path) -> None:
    cfg = lot_config(tmp_path, slots=3, extra=GATE)
    writer = new_writer(cfg)
    task = asyncio.create_task(writer.run())
    try:
        await writer.wait_ready()
        first = await writer.submit(Enter(vehicle="AB123CD", gate="in1"))
        second = await writer.submit(Enter(vehicle="CD456EF", gate="in1"))
        passed = GateEvent(gate="in1", code="passed", seq=7)
        assert (await writer.submit(passed)).data == {"applied": True, "session_id": first.data["session_id"]}
        # Delivered again (a gateway restart lost the link's memory): not applied, the second car still waits.
        assert (await writer.submit(passed)).data == {"applied": False}
        # Another event under that seq (a controller that restarted its counter) is a new event.
        backed = await writer.submit(GateEvent(gate="in1", code="backed_out", seq=7))
        assert backed.data == {"applied": True, "session_id": second.data["session_id"]}
        # The memory is the last few events: seq 7 is forgotten once EVENTS_KEPT others came after it.
        for seq in range(100, 100 + EVENTS_KEPT):
            await writer.submit(GateEvent(gate="in1", code="forced_open", seq=seq))
        ticket = await writer.submit(GateEvent(gate="in1", code="ticket", seq=7))
        assert ticket.ok and ticket.data["applied"] and ticket.data["slot"] == "A-002"
        assert normalise(ticket.data["ticket"]) == ticket.data["ticket"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    conn = reader(cfg)
    try:
        assert audit(conn) == []
        states = dict(conn.execute("SELECT state, COUNT(*) FROM sessions GROUP BY state").fetchall())
        assert states == {"active": 2, "cancelled": 1}
    finally:
        conn.close()


def test_signs_money_and_tickets() -> None:
    assert money(350, "EUR") == "3.50 EUR"
    assert money(5, "EUR") == "0.05 EUR"
    assert money(1200, "JPY") == "1200 JPY"
    assert money(1234, "KWD") == "1.234 KWD"
    assert money(99, None) == "0.99"
    assert sign_text("Straße L1-042 " + "x" * 40) == ("Stra?e L1-042 " + "x" * 40)[:32]
    tickets = {new_ticket() for _ in range(1000)}
    assert len(tickets) == 1000
    for t in tickets:
        assert len(t) == 16 and t[0] == "T" and set(t[1:]) <= set(TICKET_CHARS)
        assert normalise(t) == t
    # No character a camera or a clerk confuses with another (the confusion merge of exit matching).
    assert set(TICKET_CHARS).isdisjoint("O0DQI1S5B8Z2")
