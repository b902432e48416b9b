"""A simulated barrier controller: loops, barrier motion, the GCP/1 controller side, and a script for tests."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import TracebackType

from simulators.barrier import wire
from simulators.barrier.line import PtyLine


class BarrierState(IntEnum):
    CLOSED = 0
    OPENING = 1
    OPEN = 2
    CLOSING = 3
    FAULT = 4


class GateMode(IntEnum):
    NORMAL = 0
    LOCKED_OPEN = 1
    LOCKED_CLOSED = 2


class SimError(Exception):
    """A script step that cannot happen (a car passing a closed barrier, two cars on one loop)."""


@dataclass
class Timings:
    """Seconds. The defaults are fast, for tests; the demo passes slower ones."""

    opening: float = 0.1
    closing: float = 0.1
    hold: float = 1.0  # open this long (OPEN with hold_s 0), and again after a vehicle passed
    dwell: float = 0.05  # a passing vehicle's time on each step over the loops
    status_interval: float = 1.0
    event_resend: float = 0.5
    repeat_window: float = 2.0


# As slow as a person can watch (the demo, `parking-gateway simulate --barriers`), yet a lane serves a car a second.
STREET_TIMINGS = Timings(opening=0.4, closing=0.4, hold=1.0, dwell=0.2)


@dataclass
class Noise:
    """Line noise on what the controller sends (and losses on what it receives), as probabilities per frame.

    Whether a given frame is damaged depends only on the seed, its bytes and how often it was sent before, not on
    what else was on the line, so a test with a fixed host seq sees the same damage every run.
    """

    garbage: float = 0.0  # random bytes, rich in STX, before the frame
    corrupt: float = 0.0  # the frame goes out with one byte changed
    truncate: float = 0.0  # the frame goes out cut short
    inbound: float = 0.0  # a frame from the host is lost
    seed: int = 0


@dataclass(frozen=True)
class Command:
    """A frame the controller received from the host, with the state it found."""

    at: float  # loop time
    seq: int
    cmd: int
    payload: bytes
    loop_a: bool
    loop_b: bool
    barrier: BarrierState
    outcome: str  # executed | repeat | answered (PING) | ack | lost (noise, lose_host_acks) | ignored
    result: int | None = None


@dataclass
class SentEvent:
    seq: int
    code: int
    fault_code: int | None
    sends: int = 0
    acks: int = 0  # ACK frames received for it (a duplicate ACK counts)
    acked_at: float | None = None
    dropped: bool = False  # too many unacknowledged: given up


class BarrierSim:
    """One controller at `address`, on its own pty at `path` or on a shared `line` (multi-drop)."""

    MAX_UNACKED = 32

    def __init__(
        self,
        path: Path | None = None,
        *,
        address: int = 1,
        timings: Timings | None = None,
        noise: Noise | None = None,
        first_event_seq: int = 1,
        events_in_flight: int = 1,
        line: PtyLine | None = None,
    ) -> None:
        if line is None:
            if path is None:
                raise ValueError("give a path for a pty of its own, or a shared line")
            line = PtyLine(path)
        self.line = line
        self._owns_line = path is not None
        self.address = address
        self.timings = timings or Timings()
        self.noise = noise or Noise()
        self._change = asyncio.Event()  # set (and replaced) whenever the barrier moves or a frame comes in
        self.barrier = BarrierState.CLOSED
        self.mode = GateMode.NORMAL
        self.loop_a = False
        self.loop_b = False
        self.display_text = ""
        self.fault_code: int | None = None
        self.silent = False
        self.reversals = 0  # closings stopped because a vehicle came onto a loop
        self.received: list[Command] = []
        self.events: list[SentEvent] = []
        self.acks_dropped = 0
        self._deframer = wire.Deframer()
        self._event_seq = first_event_seq
        # Events on the line awaiting their ACK, at most `events_in_flight`; the rest wait their turn in order.
        self.events_in_flight = events_in_flight
        self._unacked: dict[int, SentEvent] = {}
        self._waiting: deque[SentEvent] = deque()
        self._last_by_seq: dict[int, SentEvent] = {}
        self._resend: dict[int, asyncio.TimerHandle] = {}
        self._last_exec: tuple[int, int, bytes, float, int] | None = None
        self._hold = self.timings.hold
        self._close_when_clear = False
        self._motion: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._drop_acks = 0
        self._lose_host_acks = 0
        self._garbage_rng = random.Random(self.noise.seed)
        self._sent_count: dict[tuple[str, bytes], int] = {}

    @property
    def path(self) -> Path:
        return self.line.path

    @property
    def barrier(self) -> BarrierState:
        return self._barrier

    @barrier.setter
    def barrier(self, state: BarrierState) -> None:
        self._barrier = state
        self._notify()

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def wait_until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until `condition()` holds, checked again whenever the barrier moves or a frame from the host comes
        in (a command, an ACK); False after `timeout` seconds. For drivers of simulated cars."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    await self._change.wait()
        except TimeoutError:
            return False
        return True

    @property
    def commands(self) -> list[Command]:
        """What the host sent, without its ACKs."""
        return [c for c in self.received if c.cmd != wire.HOST_ACK]

    @property
    def unacked(self) -> list[SentEvent]:
        """Events not acknowledged yet: on the line, then those waiting their turn."""
        return [*self._unacked.values(), *self._waiting]

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.line.listeners.append(self._bytes)
        if self._owns_line:
            self.line.plug()
        self._status_task = asyncio.get_running_loop().create_task(
            self._status_loop(), name=f"barrier-sim-{self.address}"
        )

    async def close(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            try:
                await self._status_task
            except asyncio.CancelledError:
                pass
            self._status_task = None
        for handle in (self._motion, self._hold_timer, *self._resend.values()):
            if handle is not None:
                handle.cancel()
        self._resend.clear()
        if self._bytes in self.line.listeners:
            self.line.listeners.remove(self._bytes)
        if self._owns_line:
            self.line.unplug()

    async def __aenter__(self) -> BarrierSim:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the script -----------------------------------------------------------------------------------------

    def vehicle_arrives(self) -> None:
        if self.loop_a:
            raise SimError("a vehicle is already on loop A")
        self.loop_a = True
        self._emit(wire.ARRIVED)
        self._loops_changed()

    async def vehicle_passes(self) -> None:
        """Over loop A and B, past the barrier (which must be open), then off B: PASSED."""
        if not self.loop_a or self.loop_b:
            raise SimError("a passing vehicle starts on loop A alone")
        if self.barrier != BarrierState.OPEN:
            raise SimError(f"the barrier is {self.barrier.name}, not OPEN")
        self.loop_b = True
        self._loops_changed()
        await asyncio.sleep(self.timings.dwell)
        self.loop_a = False
        self._loops_changed()
        await asyncio.sleep(self.timings.dwell)
        self.loop_b = False
        self._emit(wire.PASSED)
        if self.barrier == BarrierState.OPEN and not self._close_when_clear:
            self._restart_hold()
        self._loops_changed()

    def vehicle_backs_out(self) -> None:
        if not self.loop_a or self.loop_b:
            raise SimError("backing out needs a vehicle on loop A alone")
        self.loop_a = False
        self._emit(wire.BACKED_OUT)
        self._loops_changed()

    def set_loops(self, a: bool, b: bool) -> None:
        """Loop presence directly, without events (for randomised tests of the host's safety rules)."""
        self.loop_a, self.loop_b = a, b
        self._loops_changed()

    def press_ticket(self) -> None:
        self._emit(wire.TICKET)

    def force_open(self) -> None:
        """Somebody lifts the arm: OPEN at once, FORCED_OPEN; it closes after the hold like any opening."""
        self._stop_motion()
        self.barrier = BarrierState.OPEN
        self.fault_code = None
        self._emit(wire.FORCED_OPEN)
        self._restart_hold()

    def fault(self, code: int) -> None:
        self._stop_motion()
        self._cancel_hold()
        self._close_when_clear = False
        self.barrier = BarrierState.FAULT
        self.fault_code = code
        self._emit(wire.FAULTED, code)

    def clear_fault(self) -> None:
        if self.barrier == BarrierState.FAULT:
            self.barrier = BarrierState.CLOSED
            self.fault_code = None

    def go_silent(self) -> None:
        """Stop transmitting anything (a broken TX line); commands are still heard and executed."""
        self.silent = True

    def resume(self) -> None:
        self.silent = False

    def unplug(self) -> None:
        self.line.unplug()

    def replug(self) -> None:
        self.line.plug()

    def drop_acks(self, n: int) -> None:
        """The next `n` ACKs this controller sends never reach the host."""
        self._drop_acks += n

    def lose_host_acks(self, n: int) -> None:
        """The next `n` ACKs the host sends for events never reach this controller."""
        self._lose_host_acks += n

    # --- receiving ------------------------------------------------------------------------------------------

    def _bytes(self, data: bytes) -> None:
        for f in self._deframer.push(data):
            if f.addr == self.address:
                self._receive(f)
                self._notify()

    def _receive(self, f: wire.Received) -> None:
        now = asyncio.get_running_loop().time()

        def record(outcome: str, result: int | None = None) -> None:
            self.received.append(
                Command(now, f.seq, f.cmd, f.payload, self.loop_a, self.loop_b, self.barrier, outcome, result)
            )

        if self._lost(f):
            record("lost")
            return
        if f.cmd == wire.HOST_ACK:
            if self._lose_host_acks:
                self._lose_host_acks -= 1
                record("lost")
                return
            record("ack")
            self._host_ack(f, now)
            return
        if f.cmd == wire.PING:
            record("answered")
            self._send(wire.frame(self.address, f.seq, wire.STATUS, self._status_payload()))
            return
        last = self._last_exec
        if last is not None and last[:3] == (f.seq, f.cmd, f.payload) and now - last[3] < self.timings.repeat_window:
            record("repeat", last[4])
            self._send_ack(f.seq, last[4])
            return
        result = self._execute(f.cmd, f.payload)
        if result is None:
            record("ignored")
            return
        self._last_exec = (f.seq, f.cmd, f.payload, now, result)
        record("executed", result)
        self._send_ack(f.seq, result)

    def _host_ack(self, f: wire.Received, now: float) -> None:
        if len(f.payload) != 2 or f.payload[0] != f.seq:
            return
        event = self._last_by_seq.get(f.seq)
        if event is not None:
            event.acks += 1
        if self._unacked.pop(f.seq, None) is not None and event is not None:
            event.acked_at = now
            handle = self._resend.pop(f.seq, None)
            if handle is not None:
                handle.cancel()
            self._pump()

    def _execute(self, cmd: int, payload: bytes) -> int | None:
        if cmd == wire.OPEN:
            return self._open_cmd(payload[0]) if len(payload) == 1 else wire.FAULT
        if cmd == wire.CLOSE:
            return self._close_cmd() if not payload else wire.FAULT
        if cmd == wire.SET_MODE:
            if len(payload) != 1 or payload[0] > 2:
                return wire.FAULT
            self._set_mode(GateMode(payload[0]))
            return wire.OK
        if cmd == wire.DISPLAY:
            if len(payload) > wire.MAX_LEN or any(not 0x20 <= b <= 0x7E for b in payload):
                return wire.FAULT
            self.display_text = payload.decode("ascii")
            return wire.OK
        return None

    # --- the barrier ----------------------------------------------------------------------------------------

    def _open_cmd(self, hold_s: int) -> int:
        if self.barrier == BarrierState.FAULT:
            return wire.FAULT
        if self.mode == GateMode.LOCKED_CLOSED:
            return wire.REFUSED
        self._hold = hold_s or self.timings.hold
        self._close_when_clear = False
        self._raise()
        return wire.OK

    def _close_cmd(self) -> int:
        if self.barrier == BarrierState.FAULT:
            return wire.FAULT
        if self.loop_a or self.loop_b or self.mode == GateMode.LOCKED_OPEN:
            return wire.REFUSED
        if self.barrier in (BarrierState.OPEN, BarrierState.OPENING):
            self._close_when_clear = True
            self._try_close()
        return wire.OK

    def _set_mode(self, mode: GateMode) -> None:
        self.mode = mode
        if mode == GateMode.LOCKED_OPEN:
            self._cancel_hold()
            self._close_when_clear = False
            if self.barrier != BarrierState.FAULT:
                self._raise()
        elif mode == GateMode.LOCKED_CLOSED:
            if self.barrier in (BarrierState.OPEN, BarrierState.OPENING):
                self._close_when_clear = True
                self._try_close()
        elif self.barrier == BarrierState.OPEN:
            self._restart_hold()

    def _raise(self) -> None:
        if self.barrier == BarrierState.OPEN:
            self._restart_hold()
        elif self.barrier != BarrierState.OPENING:
            self._stop_motion()
            self.barrier = BarrierState.OPENING
            self._motion = asyncio.get_running_loop().call_later(self.timings.opening, self._opened)

    def _opened(self) -> None:
        self._motion = None
        self.barrier = BarrierState.OPEN
        self._emit(wire.OPENED)
        if self._close_when_clear:
            self._try_close()
        else:
            self._restart_hold()

    def _try_close(self) -> None:
        """Close now if nothing is on a loop; otherwise as soon as the loops clear (never onto a vehicle)."""
        if self.barrier != BarrierState.OPEN or self.loop_a or self.loop_b:
            return
        self._close_when_clear = False
        self._cancel_hold()
        self.barrier = BarrierState.CLOSING
        self._motion = asyncio.get_running_loop().call_later(self.timings.closing, self._closed)

    def _closed(self) -> None:
        self._motion = None
        self.barrier = BarrierState.CLOSED
        self._emit(wire.CLOSED)

    def _hold_over(self) -> None:
        self._hold_timer = None
        self._close_when_clear = True
        self._try_close()

    def _loops_changed(self) -> None:
        occupied = self.loop_a or self.loop_b
        if occupied and self.barrier == BarrierState.CLOSING:
            self.reversals += 1
            self._close_when_clear = False
            self._stop_motion()
            self.barrier = BarrierState.OPENING
            self._motion = asyncio.get_running_loop().call_later(self.timings.opening, self._opened)
        elif not occupied and self._close_when_clear:
            self._try_close()

    def _restart_hold(self) -> None:
        self._cancel_hold()
        if self.mode != GateMode.LOCKED_OPEN:
            self._hold_timer = asyncio.get_running_loop().call_later(self._hold, self._hold_over)

    def _cancel_hold(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _stop_motion(self) -> None:
        if self._motion is not None:
            self._motion.cancel()
            self._motion = None

    # --- sending --------------------------------------------------------------------------------------------

    def _status_payload(self) -> bytes:
        return bytes([self.barrier, int(self.loop_a) | int(self.loop_b) << 1, self.mode])

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timings.status_interval)
            self._send(wire.frame(self.address, 0, wire.STATUS, self._status_payload()))

    def _send_ack(self, seq: int, result: int) -> None:
        if self._drop_acks:
            self._drop_acks -= 1
            self.acks_dropped += 1
            return
        self._send(wire.frame(self.address, seq, wire.CTRL_ACK, bytes([seq, result])))

    def _emit(self, code: int, fault_code: int | None = None) -> None:
        seq = self._event_seq
        self._event_seq = seq % 255 + 1
        event = SentEvent(seq, code, fault_code)
        self.events.append(event)
        self._waiting.append(event)
        while len(self._unacked) + len(self._waiting) > self.MAX_UNACKED:  # a controller's memory is small
            if self._waiting:
                self._waiting.popleft().dropped = True
            else:
                oldest = next(iter(self._unacked))
                self._unacked.pop(oldest).dropped = True
                handle = self._resend.pop(oldest, None)
                if handle is not None:
                    handle.cancel()
        self._pump()

    def _pump(self) -> None:
        while self._waiting and len(self._unacked) < self.events_in_flight:
            event = self._waiting.popleft()
            old = self._unacked.pop(event.seq, None)
            if old is not None:  # the seq came round while that one was still unacknowledged
                old.dropped = True
            self._unacked[event.seq] = event
            self._last_by_seq[event.seq] = event
            self._send_event(event)

    def _send_event(self, event: SentEvent) -> None:
        if self._unacked.get(event.seq) is not event:
            return
        payload = bytes([event.code]) if event.fault_code is None else bytes([event.code, event.fault_code])
        if self._send(wire.frame(self.address, event.seq, wire.EVENT, payload)):
            event.sends += 1
        self._resend[event.seq] = asyncio.get_running_loop().call_later(
            self.timings.event_resend, self._send_event, event
        )

    def _send(self, data: bytes) -> bool:
        if self.silent:
            return False
        noise = self.noise
        if noise.garbage and self._garbage_rng.random() < noise.garbage:
            rng = self._garbage_rng
            size = rng.randint(1, 12)
            self.line.write(bytes(wire.STX if rng.random() < 0.2 else rng.randrange(256) for _ in range(size)))
        if noise.corrupt or noise.truncate:
            rng = self._decide("out", data)
            r = rng.random()
            if r < noise.corrupt:
                at = rng.randrange(len(data))
                data = data[:at] + bytes([data[at] ^ rng.randint(1, 255)]) + data[at + 1 :]
            elif r < noise.corrupt + noise.truncate:
                data = data[: rng.randrange(1, len(data))]
        self.line.write(data)
        return True

    def _lost(self, f: wire.Received) -> bool:
        if not self.noise.inbound:
            return False
        data = wire.frame(f.addr, f.seq, f.cmd, f.payload)
        return self._decide("in", data).random() < self.noise.inbound

    def _decide(self, direction: str, data: bytes) -> random.Random:
        key = (direction, data)
        n = self._sent_count.get(key, 0) + 1
        if len(self._sent_count) > 4096:
            self._sent_count.clear()
        self._sent_count[key] = n
        return random.Random(f"{self.noise.seed}:{direction}:{data.hex()}:{n}")


@dataclass
class BarrierFleet:
    """Controllers, each on its own pty: `count` of them at `<directory>/<prefix><n>` (n from 1), or with `names`
    one per name at `<directory>/<name>` (e.g. a gate id); at `addresses[name]`, else `address`.

    For `parking-gateway simulate` and the demo: `paths = await fleet.start()`, point each gate's
    `serial.port` at one, `await fleet.close()` at the end.
    """

    directory: Path
    count: int = 0
    prefix: str = "ttyGATE"
    address: int = 1
    timings: Timings | None = None
    names: Sequence[str] = ()
    addresses: Mapping[str, int] = field(default_factory=dict)
    sims: list[BarrierSim] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [sim.path for sim in self.sims]

    @property
    def by_name(self) -> dict[str, BarrierSim]:
        """The controllers by their file name in `directory` (the gate id, with `names`)."""
        return {sim.path.name: sim for sim in self.sims}

    async def start(self) -> list[Path]:
        self.directory.mkdir(parents=True, exist_ok=True)
        names = list(self.names) or [f"{self.prefix}{n}" for n in range(1, self.count + 1)]
        for name in names:
            address = self.addresses.get(name, self.address)
            sim = BarrierSim(self.directory / name, address=address, timings=self.timings)
            await sim.start()
            self.sims.append(sim)
        return self.paths

    async def close(self) -> None:
        for sim in self.sims:
            await sim.close()
        self.sims.clear()

    async def __aenter__(self) -> BarrierFleet:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
