"""The daemon: wires the store, the writer and the buses under one TaskGroup; stops cleanly on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from gateway.config import GatewayConfig
from gateway.domain import Housekeeping
from gateway.plates import PlateKey
from gateway.store import db_path
from gateway.writer import Writer

log = structlog.get_logger("gateway")

HOUSEKEEPING_EVERY = 300.0


class Gateway:
    """Everything one running gateway owns. `run()` returns when `stop()` is called or a task fails."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        state = config.state_path()
        state.mkdir(parents=True, exist_ok=True)
        self.key = PlateKey.load_or_create(state / config.privacy.plate_key_file)
        self.writer = Writer(db_path(state), config, self.key)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            writer = tg.create_task(self.writer.run(), name="writer")
            await self.writer.wait_ready()
            house = tg.create_task(self._housekeeping(), name="housekeeping")
            log.info("gateway started", gateway=self.config.gateway.id, store=str(db_path(self.config.state_path())))
            await self._stop.wait()
            log.info("gateway stopping")
            house.cancel()
            writer.cancel()

    async def _housekeeping(self) -> None:
        while True:
            await self.writer.submit(Housekeeping())
            await asyncio.sleep(HOUSEKEEPING_EVERY)


async def run_daemon(config: GatewayConfig) -> int:
    gw = Gateway(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gw.stop)
    await gw.run()
    return 0
