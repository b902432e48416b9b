"""Every few minutes the writer expires idempotency keys, trims the rejection log and erases old plates."""

from __future__ import annotations

from typing import Any

from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.domain import Housekeeping as HousekeepingCommand
from gateway.store.writer import Writer, WriterClosed

EVERY_S = 300.0


class Housekeeping:
    name = "housekeeping"

    def __init__(self, writer: Writer, *, clock: Clock = SYSTEM_CLOCK, every: float = EVERY_S) -> None:
        self._writer = writer
        self._clock = clock
        self._every = every
        self.last: dict[str, Any] = {}

    async def start(self) -> None:
        return

    async def run(self) -> None:
        while True:
            try:
                self.last = (await self._writer.submit(HousekeepingCommand())).data
            except WriterClosed:
                return
            await self._clock.sleep(self._every)

    async def stop(self) -> None:
        return

    async def health(self) -> dict[str, Any]:
        return {"last": self.last}
