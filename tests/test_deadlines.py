"""Deadlines as data: due rows fire once, in order, survive a restart, and only wall deadlines follow the wall clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.core import timers
from gateway.core.clock import ManualClock
from gateway.core.domain import Command
from gateway.core.txn import Txn
from gateway.services.deadlines import Deadlines
from gateway.store.writer import HANDLERS, Writer
from tests.helpers import lot_config, new_writer

FIRED: list[tuple[str, str, float]] = []


@dataclass(frozen=True, slots=True)
class Schedule(Command):
    kind: str
    subject: str
    due: float
    base: timers.Base = "timer"


def _schedule(txn: Txn, cmd: Schedule) -> dict[str, Any]:
    timers.schedule(txn, cmd.kind, cmd.subject, cmd.due, base=cmd.base)
    return {}


@timers.on_due("test.ping")
def _ping(txn: Txn, subject: str) -> None:
    FIRED.append(("test.ping", subject, txn.timer_now))


@timers.on_due("test.again")
def _again(txn: Txn, subject: str) -> None:
    FIRED.append(("test.again", subject, txn.timer_now))
    if subject == "twice":
        timers.schedule(txn, "test.again", "once more", txn.timer_now + 5)


@timers.on_due("test.first")
def _first(txn: Txn, subject: str) -> None:
    FIRED.append(("test.first", subject, txn.timer_now))
    timers.schedule(txn, "test.ping", "moved", txn.timer_now + 100)
    timers.cancel(txn, "test.ping", "cancelled")


@pytest.fixture(autouse=True)
def schedule_command() -> Iterator[None]:
    FIRED.clear()
    HANDLERS[Schedule] = _schedule
    yield
    del HANDLERS[Schedule]


@dataclass
class Running:
    writer: Writer
    deadlines: Deadlines
    tasks: list[asyncio.Task[None]]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.deadlines.stop()


async def start(path: Path, clock: ManualClock) -> Running:
    writer = new_writer(lot_config(path, slots=2), clock=clock)
    await writer.start()
    deadlines = Deadlines(writer, clock=clock)
    await deadlines.start()
    return Running(writer, deadlines, [asyncio.create_task(writer.run()), asyncio.create_task(deadlines.run())])


@pytest.fixture
async def clock() -> AsyncIterator[ManualClock]:
    yield ManualClock()


async def settle() -> None:
    for _ in range(20):  # a commit's round trip through the writer thread and back
        await asyncio.sleep(0.01)


async def test_due_deadlines_fire_once_in_order(tmp_path: Path, clock: ManualClock) -> None:
    gw = await start(tmp_path, clock)
    try:
        now = gw.writer.timeline.now()
        for subject, after in (("b", 20), ("a", 10), ("c", 30)):
            await gw.writer.submit(Schedule("test.ping", subject, now + after))
        clock.advance(9)
        await settle()
        assert FIRED == []
        clock.advance(16)
        await settle()
        assert [s for _, s, _ in FIRED] == ["a", "b"]
        clock.advance(100)
        await settle()
        assert [s for _, s, _ in FIRED] == ["a", "b", "c"]
        clock.advance(100)
        await settle()
        assert len(FIRED) == 3
    finally:
        await gw.stop()


async def test_a_handler_may_schedule_again(tmp_path: Path, clock: ManualClock) -> None:
    gw = await start(tmp_path, clock)
    try:
        await gw.writer.submit(Schedule("test.again", "twice", gw.writer.timeline.now() + 1))
        clock.advance(1)
        await settle()
        clock.advance(5)
        await settle()
        assert [s for _, s, _ in FIRED] == ["twice", "once more"]
    finally:
        await gw.stop()


async def test_a_row_moved_or_cancelled_by_an_earlier_handler_of_the_batch_does_not_fire(
    tmp_path: Path, clock: ManualClock
) -> None:
    gw = await start(tmp_path, clock)
    try:
        now = gw.writer.timeline.now()
        await gw.writer.submit(Schedule("test.first", "x", now + 1))
        await gw.writer.submit(Schedule("test.ping", "moved", now + 2))
        await gw.writer.submit(Schedule("test.ping", "cancelled", now + 3))
        clock.advance(10)  # all three are due in one batch; the first moves one and cancels the other
        await settle()
        assert [s for _, s, _ in FIRED] == ["x"]
        clock.advance(100)
        await settle()
        assert [s for _, s, _ in FIRED] == ["x", "moved"]
    finally:
        await gw.stop()


async def test_wall_steps_move_only_wall_deadlines(tmp_path: Path, clock: ManualClock) -> None:
    gw = await start(tmp_path, clock)
    try:
        await gw.writer.submit(Schedule("test.ping", "timer", gw.writer.timeline.now() + 3600))
        await gw.writer.submit(Schedule("test.ping", "appointment", clock.wall() + 3600, base="wall"))
        clock.jump(2 * 3600)  # NTP steps the clock forward
        clock.advance(1)
        await settle()
        assert [s for _, s, _ in FIRED] == ["appointment"]
        clock.jump(-4 * 3600)
        clock.advance(3600)
        await settle()
        assert [s for _, s, _ in FIRED] == ["appointment", "timer"]
    finally:
        await gw.stop()


async def test_a_deadline_survives_a_restart_and_fires_on_time(tmp_path: Path, clock: ManualClock) -> None:
    gw = await start(tmp_path, clock)
    due = gw.writer.timeline.now() + 600
    await gw.writer.submit(Schedule("test.ping", "grace", due))
    clock.advance(400)
    await gw.stop()  # the process ends with the deadline 200 s away
    gw = await start(tmp_path, clock)
    try:
        clock.advance(199)
        await settle()
        assert FIRED == []
        clock.advance(1)
        await settle()
        ((kind, subject, when),) = FIRED
        assert (kind, subject) == ("test.ping", "grace") and when == pytest.approx(due)
    finally:
        await gw.stop()
