"""Wakes the writer when the earliest deadline in the store has come (gateway/core/timers.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.domain import FireDue
from gateway.store.writer import Committed, Writer, WriterClosed

# A wall-clock appointment can come early when NTP steps the clock forward: look again at least this often.
WALL_RECHECK_S = 30.0
# After a FireDue that found nothing due (clocks read a moment apart), before looking again.
IDLE_RETRY_S = 0.05


class Deadlines:
    name = "deadlines"

    def __init__(self, writer: Writer, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._writer = writer
        self._clock = clock
        self._wakeup = asyncio.Event()
        self.fired = 0

    async def start(self) -> None:
        self._writer.add_listener(self._on_commit)

    def _on_commit(self, done: Committed) -> None:
        if done.next_due is not None:
            self._wakeup.set()

    def _timeout(self) -> float | None:
        timer_due, wall_due = self._writer.next_due
        waits = []
        if timer_due is not None:
            waits.append(self._writer.timeline.seconds_until(timer_due))
        if wall_due is not None:
            waits.append(min(wall_due - self._clock.wall(), WALL_RECHECK_S))
        return max(0.0, min(waits)) if waits else None

    async def run(self) -> None:
        while True:
            self._wakeup.clear()
            timeout = self._timeout()
            if timeout is None or timeout > 0:
                await self._clock.wait(self._wakeup, timeout)
                continue
            try:
                reply = await self._writer.submit(FireDue())
            except WriterClosed:
                return
            fired = sum(reply.data.get("fired", {}).values())
            self.fired += fired
            if not fired:
                await self._clock.wait(self._wakeup, IDLE_RETRY_S)

    async def stop(self) -> None:
        self._writer.remove_listener(self._on_commit)

    async def health(self) -> dict[str, Any]:
        timer_due, wall_due = self._writer.next_due
        return {
            "fired": self.fired,
            "next_in_s": self._timeout(),
            "pending": timer_due is not None or wall_due is not None,
        }
