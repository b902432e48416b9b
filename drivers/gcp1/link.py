"""The host side of GCP/1: one `GcpLink` per serial port, one `Controller` per address on it (contract §5).

See the package docstring for the API and its rules. Every timer runs on the event loop's monotonic clock.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import structlog
from structlog.typing import FilteringBoundLogger

from drivers.gcp1.frames import (
    Ack,
    AckResult,
    Close,
    Cmd,
    Display,
    Event,
    Frame,
    FrameParser,
    HostMessage,
    Mode,
    Open,
    PayloadError,
    Ping,
    SetMode,
    Status,
    decode_controller,
    encode,
)
from drivers.gcp1.transport import Backoff, SerialPort

__all__ = [
    "Controller",
    "EventHandler",
    "GcpError",
    "GcpLink",
    "LinkDown",
    "LinkStats",
    "NoAck",
    "OnlineHandler",
    "StatusHandler",
]

EventHandler = Callable[[Event], Awaitable[None]]
OnlineHandler = Callable[[bool], None]
StatusHandler = Callable[[Status], None]


class GcpError(Exception):
    """A command that did not get through; the lane raises `gate.fault` for it."""


class LinkDown(GcpError):
    """The serial port is not open (unplugged, not there yet) or the link is closed."""


class NoAck(GcpError):
    """No ACK (or, for PING, no STATUS) after the first send and every resend."""

    def __init__(self, address: int, cmd: Cmd, seq: int, attempts: int) -> None:
        super().__init__(f"controller {address}: no answer to {cmd.name} seq {seq} after {attempts} sends")
        self.address = address
        self.cmd = cmd
        self.seq = seq
        self.attempts = attempts


@dataclass
class LinkStats:
    """Counters of one link; bad input is counted here, never raised."""

    frames_in: int = 0
    frames_out: int = 0
    bad_crc: int = 0
    bad_length: int = 0
    noise_bytes: int = 0  # bytes discarded while resynchronising
    malformed: int = 0  # good CRC, payload not as §5 says
    unknown_address: int = 0
    stale_replies: int = 0  # an ACK or PING STATUS nobody waits for (late, or answering a resend)
    resends: int = 0
    no_ack: int = 0
    refused_by_belt: int = 0
    duplicate_events: int = 0
    handler_errors: int = 0
    events_dropped: int = 0  # not taken (queue full): not acknowledged, so the controller resends


@dataclass
class _Pending:
    seq: int
    cmd: Cmd
    future: asyncio.Future[AckResult | Status] = field(repr=False)


class Controller:
    """The host's view of the controller at one address: commands, its latest STATUS, online or not."""

    # Events taken but not yet handled; past it an event is left unacknowledged and the controller resends it.
    MAX_QUEUED_EVENTS = 64

    def __init__(
        self,
        link: GcpLink,
        address: int,
        on_event: EventHandler,
        on_online: OnlineHandler | None,
        on_status: StatusHandler | None,
        initial_seq: int | None,
    ) -> None:
        if not 0 <= address <= 255:
            raise ValueError(f"address is a byte, not {address}")
        if initial_seq is not None and not 1 <= initial_seq <= 255:
            raise ValueError(f"seqs run 1..255, not {initial_seq}")
        self.address = address
        self.status: Status | None = None
        self.status_at: float | None = None  # loop time of that STATUS
        self.last_heard: float | None = None  # loop time of the last good frame from this address
        self._link = link
        self._on_event = on_event
        self._on_online = on_online
        self._on_status = on_status
        # a random start, so that a restarted host is not taken for a repeat by the controller (§5)
        self._seq = initial_seq if initial_seq is not None else random.randint(1, 255)
        self._lock = asyncio.Lock()
        self._pending: _Pending | None = None
        self._online: bool | None = None
        self._offline_timer: asyncio.TimerHandle | None = None
        self._queue: deque[tuple[int, bytes, Event]] = deque()
        self._queued = asyncio.Event()
        self._in_hand: dict[int, bytes] = {}  # seq -> payload of events queued or being handled
        self._seen: dict[int, tuple[bytes, float]] = {}  # seq -> (payload, loop time the memory ends)
        self._worker: asyncio.Task[None] | None = None

    # --- commands -------------------------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """Heard within the last `offline_after` seconds, on an open port."""
        return self._online is True

    async def open_barrier(self, hold_s: int = 0) -> AckResult:
        """OPEN; `hold_s` 0 = the controller's default hold."""
        return await self.command(Open(hold_s))

    async def close_barrier(self) -> AckResult:
        """CLOSE, unless the latest STATUS shows a loop occupied: then REFUSED without sending (a belt; the lane
        keeps guarantee 6 itself)."""
        return await self.command(Close())

    async def set_mode(self, mode: Mode) -> AckResult:
        return await self.command(SetMode(mode))

    async def display(self, text: str) -> AckResult:
        """The lane sign; ValueError unless printable ASCII of at most 32 characters."""
        return await self.command(Display(text))

    async def ping(self) -> Status:
        """PING; the STATUS that answers it (also stored as `status`)."""
        reply = await self._exchange(Ping())
        assert isinstance(reply, Status)
        return reply

    async def command(self, message: HostMessage) -> AckResult:
        """Send a command and return the ACK's result; raise `LinkDown` or `NoAck` when it does not get through.

        Commands to one controller go one at a time (the controller detects repeats by its last command only).
        """
        if isinstance(message, Ack | Ping):
            raise TypeError("ACKs are sent by the link itself, PING by ping()")
        reply = await self._exchange(message)
        assert isinstance(reply, AckResult)
        return reply

    async def _exchange(self, message: HostMessage) -> AckResult | Status:
        link = self._link
        async with self._lock:
            if isinstance(message, Close) and self.status is not None and self.status.loops:
                link._stats.refused_by_belt += 1
                return AckResult.REFUSED
            if not link.port.is_open:
                raise LinkDown(f"{link.port.url} is not open")
            seq = self._seq
            self._seq = seq % 255 + 1
            wire = encode(self.address, seq, message)
            future: asyncio.Future[AckResult | Status] = asyncio.get_running_loop().create_future()
            self._pending = _Pending(seq, message.cmd, future)
            try:
                for attempt in range(1 + link.retries):
                    if attempt:
                        link._stats.resends += 1
                    if not link._write(wire):
                        raise LinkDown(f"{link.port.url} closed")
                    done, _ = await asyncio.wait((future,), timeout=link.ack_timeout)
                    if done:
                        return future.result()
            finally:
                self._pending = None
            link._stats.no_ack += 1
            raise NoAck(self.address, message.cmd, seq, 1 + link.retries)

    # --- from the link --------------------------------------------------------------------------------------

    def _frame(self, frame: Frame, now: float) -> None:
        self.last_heard = now
        if self._online is not True:
            self._set_online(True)
        link = self._link
        try:
            message = decode_controller(frame)
        except PayloadError as e:
            link._stats.malformed += 1
            link._log.warning("gcp1.malformed", address=self.address, seq=frame.seq, error=str(e))
            if frame.cmd == Cmd.EVENT and frame.seq:
                # it can never be handled: acknowledge it, or the controller resends it every 500 ms forever
                self._ack(frame.seq)
            return
        if isinstance(message, Status):
            self.status = message
            self.status_at = now
            if frame.seq:
                self._reply(frame.seq, Cmd.PING, message)
            if self._on_status is not None:
                self._on_status(message)
        elif isinstance(message, Ack):
            self._reply(frame.seq, None, message.result)
        else:
            self._event(frame.seq, frame.payload, message, now)

    def _reply(self, seq: int, cmd: Cmd | None, value: AckResult | Status) -> None:
        pending = self._pending
        if (
            pending is None
            or pending.seq != seq
            or (cmd is Cmd.PING) != (pending.cmd is Cmd.PING)
            or pending.future.done()
        ):
            self._link._stats.stale_replies += 1
            return
        pending.future.set_result(value)

    def _event(self, seq: int, payload: bytes, event: Event, now: float) -> None:
        stats = self._link._stats
        if seq == 0:
            stats.malformed += 1  # seq 0 is STATUS's
            return
        seen = self._seen.get(seq)
        if seen is not None and seen[0] == payload and seen[1] > now:
            stats.duplicate_events += 1
            self._seen[seq] = (payload, now + self._link.dedupe_window)
            self._ack(seq)
            return
        if self._in_hand.get(seq) == payload:
            stats.duplicate_events += 1  # a resend while the first copy is still being handled: ACK comes then
            return
        if len(self._queue) >= self.MAX_QUEUED_EVENTS:
            stats.events_dropped += 1
            return
        self._in_hand[seq] = payload
        self._queue.append((seq, payload, event))
        self._queued.set()

    async def _deliver(self) -> None:
        """Hands events to `on_event` one at a time, in arrival order; ACKs each once its handler returned."""
        link = self._link
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            seq, payload, event = self._queue.popleft()
            try:
                await self._on_event(event)
            except Exception:
                # not committed: no ACK, so the controller resends it and it is delivered again
                link._stats.handler_errors += 1
                link._log.exception("gcp1.event_handler_failed", address=self.address, seq=seq, code=event.code.name)
                continue
            finally:
                self._in_hand.pop(seq, None)
            self._seen[seq] = (payload, loop.time() + link.dedupe_window)
            self._ack(seq)

    def _ack(self, seq: int) -> None:
        self._link._write(encode(self.address, seq, Ack(seq)))

    def _set_online(self, online: bool) -> None:
        if self._online is online:
            return
        self._online = online
        link = self._link
        link._log.info("gcp1.online" if online else "gcp1.offline", address=self.address)
        if online:
            self._arm_offline_timer()
        if self._on_online is not None:
            self._on_online(online)

    def _arm_offline_timer(self) -> None:
        if self._offline_timer is None:
            loop = asyncio.get_running_loop()
            self._offline_timer = loop.call_later(self._link.offline_after, self._check_silence)

    def _check_silence(self) -> None:
        self._offline_timer = None
        link = self._link
        loop = asyncio.get_running_loop()
        since = self.last_heard if self.last_heard is not None else link._started_at
        left = since + link.offline_after - loop.time()
        if left > 0:
            self._offline_timer = loop.call_later(left, self._check_silence)
        else:
            self._set_online(False)

    def _port_opened(self, outage: float) -> None:
        # The dedupe memory counts connected time only: an ACK lost with the port must still find its event
        # remembered when the controller resends it after the replug.
        self._seen = {seq: (payload, until + outage) for seq, (payload, until) in self._seen.items()}
        self._arm_offline_timer()

    def _port_closed(self) -> None:
        pending = self._pending
        if pending is not None and not pending.future.done():
            pending.future.set_exception(LinkDown(f"{self._link.port.url} closed"))
        self._set_online(False)

    def _start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._deliver(), name=f"gcp1-events-{self.address}")
        self._arm_offline_timer()

    async def _stop(self) -> None:
        if self._offline_timer is not None:
            self._offline_timer.cancel()
            self._offline_timer = None
        pending = self._pending
        if pending is not None and not pending.future.done():
            pending.future.set_exception(LinkDown("link closed"))
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None


class GcpLink:
    """One serial port and the controllers on it; see the package docstring."""

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 9600,
        ack_timeout: float = 0.25,
        retries: int = 3,
        offline_after: float = 3.0,
        dedupe_window: float = 10.0,
        quiet_gap: float = 0.05,
        backoff: Backoff | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.offline_after = offline_after
        self.dedupe_window = dedupe_window
        self.quiet_gap = quiet_gap
        self._stats = LinkStats()
        self.controllers: dict[int, Controller] = {}
        self._log: FilteringBoundLogger = log or structlog.get_logger("drivers.gcp1").bind(port=port)
        self.port = SerialPort(port, self, baudrate=baudrate, backoff=backoff, log=self._log)
        self._parser = FrameParser()
        self._task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._down_since: float | None = None
        self._last_data = 0.0
        self._gap_timer: asyncio.TimerHandle | None = None

    def add_controller(
        self,
        address: int,
        *,
        on_event: EventHandler,
        on_online: OnlineHandler | None = None,
        on_status: StatusHandler | None = None,
        initial_seq: int | None = None,
    ) -> Controller:
        """Register the controller at `address`; frames from addresses not registered are counted and ignored."""
        if address in self.controllers:
            raise ValueError(f"controller {address} is already on {self.port.url}")
        controller = Controller(self, address, on_event, on_online, on_status, initial_seq)
        self.controllers[address] = controller
        if self._task is not None:
            controller._start()
        return controller

    @property
    def connected(self) -> bool:
        return self.port.is_open

    @property
    def stats(self) -> LinkStats:
        stats, parser = self._stats, self._parser
        stats.bad_crc, stats.bad_length, stats.noise_bytes = parser.bad_crc, parser.bad_length, parser.skipped
        return stats

    async def start(self) -> None:
        """Start keeping the port open; returns at once (the port may come later, or never)."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._down_since = None
        self._task = loop.create_task(self.port.run(), name=f"gcp1-port-{self.port.url}")
        for controller in self.controllers.values():
            controller._start()

    async def close(self) -> None:
        """Stop: the port is closed, pending commands fail with `LinkDown`, unhandled events stay unacknowledged."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        for controller in self.controllers.values():
            await controller._stop()

    async def __aenter__(self) -> GcpLink:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- PortSink -------------------------------------------------------------------------------------------

    def port_opened(self) -> None:
        now = asyncio.get_running_loop().time()
        outage = 0.0 if self._down_since is None else now - self._down_since
        self._down_since = None
        self._parser.clear()
        for controller in self.controllers.values():
            controller._port_opened(outage)

    def port_closed(self, reason: str) -> None:
        self._down_since = asyncio.get_running_loop().time()
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
        for controller in self.controllers.values():
            controller._port_closed()

    def port_data(self, data: bytes) -> None:
        parser = self._parser
        frames = parser.feed(data)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if frames:
            self._frames(frames, now)
        if parser.pending:
            self._last_data = now
            if self._gap_timer is None:
                self._gap_timer = loop.call_later(self.quiet_gap, self._quiet)

    # --- internals ------------------------------------------------------------------------------------------

    def _frames(self, frames: list[Frame], now: float) -> None:
        self._stats.frames_in += len(frames)
        controllers = self.controllers
        for frame in frames:
            controller = controllers.get(frame.addr)
            if controller is None:
                self._stats.unknown_address += 1
            else:
                controller._frame(frame, now)

    def _quiet(self) -> None:
        """The line has been quiet inside a candidate frame: that candidate is noise, rescan behind it."""
        self._gap_timer = None
        loop = asyncio.get_running_loop()
        left = self._last_data + self.quiet_gap - loop.time()
        if left > 0:
            self._gap_timer = loop.call_later(left, self._quiet)
            return
        parser = self._parser
        while parser.pending:
            frames = parser.drop_partial()
            if frames:
                self._frames(frames, loop.time())

    def _write(self, data: bytes) -> bool:
        if self.port.write(data):
            self._stats.frames_out += 1
            return True
        return False
