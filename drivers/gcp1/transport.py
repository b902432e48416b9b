"""One serial port on `pyserial-asyncio-fast`, reopened with capped exponential backoff when it vanishes.

A USB adapter that is pulled makes reads fail; the port reports `port_closed`, waits, and reopens the same
path when it comes back. Nothing here knows GCP/1: bytes go to a `PortSink` (the link).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import serial
import serial_asyncio_fast
import structlog
from structlog.typing import FilteringBoundLogger

__all__ = ["Backoff", "PortSink", "SerialPort"]


class Backoff:
    """Capped exponential backoff with jitter: `initial`, then times `factor` per call to `next`, at most `maximum`."""

    def __init__(
        self,
        initial: float = 0.1,
        maximum: float = 5.0,
        factor: float = 2.0,
        jitter: float = 0.1,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial <= maximum or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("backoff needs 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng
        self._current = initial

    def next(self) -> float:
        """The next delay; the jitter (± `jitter` of it) keeps ports that failed together from retrying together."""
        delay = self._current
        self._current = min(self._current * self.factor, self.maximum)
        return delay * (1 + self.jitter * (2 * self._rng() - 1))

    def reset(self) -> None:
        self._current = self.initial


class PortSink(Protocol):
    """What a `SerialPort` tells its owner; all three run in the event loop and must not block."""

    def port_opened(self) -> None: ...

    def port_data(self, data: bytes) -> None: ...

    def port_closed(self, reason: str) -> None: ...


class _Transport(serial_asyncio_fast.SerialTransport):
    def _fatal_error(self, exc: BaseException, message: str = "") -> None:
        # The library reports a failed write (the adapter pulled mid-frame) to the loop's exception handler, a
        # traceback in the log for an everyday event; the port's own `gcp1.port_lost` line says it once.
        self._abort(exc)


class _Adapter(asyncio.Protocol):
    def __init__(self, port: SerialPort) -> None:
        self._port = port

    def data_received(self, data: bytes) -> None:
        self._port._sink.port_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._port._lost(exc)


class SerialPort:
    """Keeps `url` open while `run()` runs; `write` sends at once or returns False while the port is closed."""

    # A port that stayed open this long failed for a new reason when it drops: start the backoff afresh.
    STABLE_AFTER = 10.0

    def __init__(
        self,
        url: str,
        sink: PortSink,
        *,
        baudrate: int = 9600,
        backoff: Backoff | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.backoff = backoff or Backoff()
        self.opens = 0
        self.open_failures = 0
        self._sink = sink
        self._log: FilteringBoundLogger = log or structlog.get_logger("drivers.gcp1").bind(port=url)
        self._transport: asyncio.Transport | None = None
        self._closed: asyncio.Future[None] | None = None
        self._stopping = False

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    def write(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    async def run(self) -> None:
        """Open, wait for the port to vanish, back off, reopen; until cancelled (which closes the port)."""
        loop = asyncio.get_running_loop()
        failing = False
        self._stopping = False
        while True:
            try:
                # opened in a thread, as the library's create_serial_connection does: opening may block briefly
                port = await loop.run_in_executor(
                    None, partial(serial.serial_for_url, self.url, baudrate=self.baudrate, exclusive=True)
                )
            except (OSError, ValueError) as e:  # serial.SerialException is an OSError
                self.open_failures += 1
                if not failing:
                    self._log.warning("gcp1.port_unavailable", error=str(e))
                failing = True
                await asyncio.sleep(self.backoff.next())
                continue
            failing = False
            transport = _Transport(loop, _Adapter(self), port)
            self._closed = loop.create_future()
            self._transport = transport
            self.opens += 1
            opened_at = loop.time()
            self._log.info("gcp1.port_open", opens=self.opens)
            self._sink.port_opened()
            try:
                await asyncio.shield(self._closed)
            finally:
                if not self._closed.done():  # cancelled: close the port ourselves and wait until it is
                    self._stopping = True
                    transport.abort()  # not close(): its flush (tcdrain) can block on a stalled line
                    await self._closed
            if loop.time() - opened_at >= self.STABLE_AFTER:
                self.backoff.reset()
            await asyncio.sleep(self.backoff.next())

    def _lost(self, exc: Any) -> None:
        self._transport = None
        if not self._stopping:  # the owner hears of a port that vanished, not of one it closed itself
            reason = "closed" if exc is None else str(exc)
            self._log.warning("gcp1.port_lost", reason=reason)
            self._sink.port_closed(reason)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
