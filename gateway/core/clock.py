"""Time, injectable: wall time for what is recorded, monotonic time for every timer and deadline.

A Pi without an RTC boots with a wrong wall clock and steps it when NTP syncs; timers that ran on wall time
would fire early or stall. So timers read `monotonic()` and sleep with `sleep()`, and only records (event
`ts`, session times) read `wall()`. Tests inject a `ManualClock` and run hours of parking in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import re
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch, for records."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps, for timers."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Until `monotonic()` has advanced by `seconds`."""
        ...

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Until `event` is set or `timeout` seconds have passed on this clock (None: no timeout)."""
        ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock moved by hand: `advance` moves both times and wakes due sleepers, `jump` only the wall time."""

    def __init__(self, wall: float = 1_800_000_000.0, monotonic: float = 1_000.0) -> None:
        self._offset = wall - monotonic
        self._mono = monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def wall(self) -> float:
        return self._mono + self._offset

    def monotonic(self) -> float:
        return self._mono

    def jump(self, seconds: float) -> None:
        """Step the wall clock (an NTP correction); timers are not affected."""
        self._offset += seconds

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def _sleeper(self, seconds: float) -> asyncio.Future[None]:
        # Registered at once, not when a task first runs: an advance() right after a wait() must count.
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._order), fut))
        return fut

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        await self._sleeper(seconds)

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        if timeout is None:
            await event.wait()
            return
        waiter = asyncio.ensure_future(event.wait())
        sleeper = self._sleeper(timeout) if timeout > 0 else asyncio.ensure_future(asyncio.sleep(0))
        try:
            await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()


class Timeline:
    """Timer time on the epoch scale: the wall time at creation plus monotonic time since.

    What timer deadlines in the store are measured in. It never jumps while the process runs; a restart
    re-anchors it to the wall clock of that moment (without an RTC, as good as the clock then is).
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._offset = clock.wall() - clock.monotonic()

    def now(self) -> float:
        return self._clock.monotonic() + self._offset

    def seconds_until(self, due: float) -> float:
        return due - self.now()


def iso_ms(t: float) -> str:
    """RFC 3339 UTC with milliseconds, as every timestamp of the contract."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 date-time, which must carry its offset (`Z` or `+01:00`)."""
    if not _RFC3339.match(text):
        raise ValueError(f"{text!r} is not an RFC 3339 date-time with an offset (e.g. 2026-12-01T10:00:00+01:00)")
    head, frac = text, ""
    m = re.search(r"\.(\d+)", text)
    if m is not None:  # fromisoformat takes at most 6 digits of fraction
        frac = m[1]
        head = text[: m.start()] + text[m.end() :]
    stamp = datetime.fromisoformat(head.upper().replace("Z", "+00:00").replace(" ", "T"))
    return stamp.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)
