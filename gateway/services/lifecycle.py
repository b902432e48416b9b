"""One lifecycle for everything the daemon runs: started in order, run side by side, stopped in reverse.

A service's `start` gets it ready (the services after it may rely on it once it returns); `run` serves until
cancelled; `stop` runs after `run` has ended (or never started) and releases what `start` took. `health` is a
JSON-ready snapshot for `R/health`. Nothing runs until every service has started, so the MQTT link does not
announce `online` before the store is open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

log = structlog.get_logger("gateway")


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...


async def serve(
    services: Sequence[Service],
    until: asyncio.Event,
    ready: asyncio.Event | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run `services` until `until` is set or one of them fails; always stop the started ones in reverse.

    `on_started` is called once every service has started and runs."""
    started: list[Service] = []
    tasks: dict[str, asyncio.Task[None]] = {}
    async with asyncio.TaskGroup() as tg:
        try:
            for service in services:
                await service.start()
                started.append(service)
            for service in services:
                tasks[service.name] = tg.create_task(service.run(), name=service.name)
            if ready is not None:
                ready.set()
            if on_started is not None:
                on_started()
            log.info("gateway started", services=[service.name for service in services])
            await until.wait()
            log.info("gateway stopping")
        finally:
            # Reverse order: whoever depends on a service is gone before it is.
            for service in reversed(started):
                task = tasks.get(service.name)
                if task is not None:
                    task.cancel()
                    await asyncio.wait([task])
                try:
                    await service.stop()
                except Exception:
                    log.exception("service failed to stop", service=service.name)
