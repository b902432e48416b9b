"""One gate's lane: its barrier controller, what the decisions ask of it, its sign, state and alerts.

What to do is decided in the core (gateway/core/lanes.py) and arrives after COMMIT as `GateAction`s; the lane
does them in order, one command at a time (OPEN before DISPLAY), and keeps an OPEN until it is acknowledged.
Controller events that need a decision are committed (in the writer's priority lane) before the handler returns,
so the link acknowledges them only then (guarantee 3).

Guarantee 6: the only CLOSE the gateway sends is the one a back-out asks for (the controller closes by itself
after a pass, and in locked-closed mode once the loops are clear). It is sent only when the lane's own view of
the loops (STATUS and events, in arrival order) is clear and a PING answered just before shows both loops
clear; the driver refuses it too while the last STATUS shows a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import structlog

from drivers.gcp1 import AckResult, Barrier, Controller, Event, EventCode, GcpError, Loops, Mode, Status
from gateway.config import GateConfig
from gateway.core.clock import Clock, Timeline, iso_ms
from gateway.core.domain import (
    GateAction,
    GateActuated,
    GateAlert,
    GateEvent,
    GateEventCode,
    GateModeName,
    GateState,
    Reply,
)
from gateway.core.lanes import SIGN_FULL, sign_text
from gateway.store.writer import Writer, WriterClosed

log = structlog.get_logger("gateway.lanes")

# A barrier open this long (outside locked-open mode) raises gate.open_too_long: a car sitting on the loop, an arm
# held up, a lost CLOSE. Three times the longest a passing car takes even at a slow lane.
OPEN_TOO_LONG_S = 120.0
RETRY_S = 1.0  # an OPEN that did not get through is tried again this often while the controller talks
MODE_RETRY_S = 5.0  # a controller whose mode differs from the one asked is told again at most this often
PERSIST_EVERY_S = 1.0  # what the controller reports reaches the store at most this often, when it changed
SIGN_IDLE = {"entry": "WELCOME", "exit": ""}
SIGN_HOLD_S = 10.0  # a decision's sign (slot, amount due) stays at least this long before the idle sign
# A car on loop A: its camera read (or ticket press) is expected this soon; the writer starts no other group commit
# meanwhile. Bounded, so that a car that never gets a read holds sensor commits back by at most this much.
EXPECT_DECISION_S = 1.0

_EVENTS: dict[EventCode, GateEventCode] = {
    EventCode.PASSED: "passed",
    EventCode.BACKED_OUT: "backed_out",
    EventCode.TICKET: "ticket",
    EventCode.FORCED_OPEN: "forced_open",
    EventCode.FAULT: "fault",
}
BARRIER_NAMES = {b: b.name.lower() for b in Barrier}
MODE_NAMES: dict[Mode, GateModeName] = {
    Mode.NORMAL: "normal",
    Mode.LOCKED_OPEN: "locked_open",
    Mode.LOCKED_CLOSED: "locked_closed",
}
MODES: dict[str, Mode] = {name: mode for mode, name in MODE_NAMES.items()}


class _NotDone(Exception):
    """An OPEN or SET_MODE that the controller did not carry out; tried again later."""


class Lane:
    """One gate with a barrier controller; `Lanes` wires its callbacks to the controller and feeds it actions."""

    def __init__(
        self,
        gate: GateConfig,
        writer: Writer,
        publish: Callable[[str, bytes], None],
        topic: str,
        *,
        clock: Clock,
        timeline: Timeline,
        open_too_long: float = OPEN_TOO_LONG_S,
    ) -> None:
        self.gate = gate.id
        self.lot = gate.lot
        self.direction = gate.direction
        self.controller: Controller | None = None
        self._writer = writer
        self._publish = publish  # (topic, payload) -> None: retained, on every link
        self._topic = topic
        self._clock = clock
        self._timeline = timeline
        self.open_too_long = open_too_long
        # What the controller reported, with events folded in as they arrive (STATUS comes once a second).
        self.online: bool | None = None
        self.barrier: Barrier | None = None
        self.reported_mode: Mode | None = None
        self.loops = Loops.NONE
        self.heard_at: float | None = None  # wall time
        self.desired_mode: GateModeName = "normal"
        self.full = False
        self.sign: str | None = None
        self.todo: deque[GateAction] = deque()
        self.opens = 0  # OPENs acknowledged
        self.closes = 0  # CLOSEs sent
        self.faults = 0
        self._offline_alerted = False
        self._faulted = False  # a gate.fault for a failed command was raised; cleared by the next success
        self._mode_sent_at: float | None = None
        self._open_since: float | None = None
        self._open_alerted = False
        self._wake = asyncio.Event()
        self._open_changed = asyncio.Event()
        self._published: tuple[Any, ...] | None = None
        self._persisted: tuple[Any, ...] | None = None
        self._persist_due = False
        self._sign_until = 0.0
        self.stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- what the lane shows ----------------------------------------------------------------------------------

    @property
    def barrier_name(self) -> str:
        if not self.online or self.barrier is None:
            return "offline"
        return BARRIER_NAMES[self.barrier]

    @property
    def mode_name(self) -> GateModeName:
        return MODE_NAMES[self.reported_mode] if self.reported_mode is not None else self.desired_mode

    def state(self) -> dict[str, Any]:
        """`R/gates/<gate>` (contract §3.2); `vehicle_present` is loop A or B."""
        return {
            "gate": self.gate,
            "barrier": self.barrier_name,
            "mode": self.mode_name,
            "vehicle_present": bool(self.loops),
            "ts": iso_ms(self._clock.wall()),
        }

    def health(self) -> dict[str, Any]:
        return {
            "online": bool(self.online),
            "barrier": self.barrier_name,
            "mode": self.mode_name,
            "loops": int(self.loops),
            "pending": len(self.todo),
            "sign": self.sign,
            "opens": self.opens,
            "closes": self.closes,
            "faults": self.faults,
        }

    def _changed(self) -> None:
        """Publish `R/gates/<gate>` and (coalesced) persist when what it shows changed."""
        key = (self.barrier_name, self.mode_name, bool(self.loops))
        if key != self._published:
            self._published = key
            self._publish(self._topic, json.dumps(self.state(), separators=(",", ":")).encode())
        stored = (self.barrier_name, self.mode_name, int(self.loops), bool(self.online))
        if stored != self._persisted and not self._persist_due:
            self._persist_due = True
            self._spawn(self._persist())
        open_now = self.online is True and self.barrier == Barrier.OPEN and self.reported_mode != Mode.LOCKED_OPEN
        if open_now != (self._open_since is not None):
            self._open_since = self._clock.monotonic() if open_now else None
            self._open_alerted = False
            self._open_changed.set()

    async def _persist(self) -> None:
        await self._clock.sleep(PERSIST_EVERY_S)
        self._persist_due = False
        stored = (self.barrier_name, self.mode_name, int(self.loops), bool(self.online))
        if stored == self._persisted:
            return
        self._persisted = stored
        with contextlib.suppress(WriterClosed):
            await self._writer.submit(GateState(self.gate, stored[0], stored[1], stored[2], stored[3], self.heard_at))

    def set_full(self, full: bool) -> None:
        if full != self.full:
            self.full = full
            self._idle_sign()

    def _idle_sign(self) -> None:
        """Back to the sign between cars once nothing is under way: FULL while the lot is, else the greeting."""
        text = SIGN_FULL if self.direction == "entry" and self.full else SIGN_IDLE[self.direction]
        if self.sign == text or self.todo or not self.online or self.barrier != Barrier.CLOSED or self.loops:
            return
        if self._clock.monotonic() >= self._sign_until:
            self.enqueue(GateAction(self.gate, display=text))

    # --- controller callbacks ---------------------------------------------------------------------------------

    def on_online(self, online: bool) -> None:
        if self.stopping:
            return  # the gateway closes the port: that is no news of the controller
        was, self.online = self.online, online
        if online:
            if self._offline_alerted:
                self._offline_alerted = False
                self._alert("gate.online", "info", "the controller talks again")
            self._wake.set()
        elif was is not False:
            self._offline_alerted = True
            self._alert("gate.offline", "critical", "no frame from the controller for 3 s")
        self._changed()

    def on_status(self, status: Status) -> None:
        self.heard_at = self._clock.wall()
        self.barrier, self.loops, self.reported_mode = status.barrier, status.loops, status.mode
        self._changed()
        wanted = MODES[self.desired_mode]
        now = self._clock.monotonic()
        if status.mode != wanted and not any(a.mode is not None for a in self.todo):
            if self._mode_sent_at is None or now - self._mode_sent_at >= MODE_RETRY_S:
                self.enqueue(GateAction(self.gate, mode=self.desired_mode))
        if self.todo and status.barrier != Barrier.FAULT:
            self._wake.set()
        self._idle_sign()

    async def on_event(self, event: Event) -> None:
        """Fold the event into the lane's view; commit it when it needs a decision. Returns once committed."""
        self.heard_at = self._clock.wall()
        code = event.code
        if code == EventCode.ARRIVED:
            self.loops |= Loops.A
            self._writer.expect_urgent(EXPECT_DECISION_S)
        elif code == EventCode.PASSED:
            self.loops = Loops.NONE
        elif code == EventCode.BACKED_OUT:
            self.loops &= ~Loops.A
        elif code in (EventCode.OPENED, EventCode.FORCED_OPEN):
            self.barrier = Barrier.OPEN
        elif code == EventCode.CLOSED:
            self.barrier = Barrier.CLOSED
        elif code == EventCode.FAULT:
            self.barrier = Barrier.FAULT
            self.faults += 1
        self._changed()
        what = _EVENTS.get(code)
        if what is not None:
            reply = await self._writer.submit(
                GateEvent(gate=self.gate, code=what, seq=event.seq, fault_code=event.fault_code), urgent=True
            )
            if not reply.ok and reply.code == "unavailable":
                # Not committed: raising keeps the event unacknowledged, so the controller sends it again.
                raise RuntimeError(f"gate event not committed: {reply.message}")
        if code == EventCode.CLOSED:
            self._idle_sign()

    # --- actions ----------------------------------------------------------------------------------------------

    def enqueue(self, action: GateAction) -> None:
        self.todo.append(action)
        self._wake.set()

    def forget(self, session_id: str) -> None:
        """That entry is settled (passed, backed out, timed out): an OPEN for it still queued is not sent."""
        if self.todo and any(a.session_id == session_id for a in self.todo):
            first = self.todo[0]  # may be in flight: it finishes
            self.todo = deque(a for a in self.todo if a is first or a.session_id != session_id)

    def start(self) -> None:
        self._changed()

    async def run(self) -> None:
        await asyncio.gather(self._work(), self._watch_open())

    async def stop(self) -> None:
        """Leave the last report in the store, marked offline: nobody watches the lane once the gateway is gone."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        barrier = BARRIER_NAMES[self.barrier] if self.barrier is not None else "offline"
        with contextlib.suppress(WriterClosed):
            await self._writer.submit(
                GateState(self.gate, barrier, self.mode_name, int(self.loops), False, self.heard_at)
            )

    async def _work(self) -> None:
        while True:
            if not self.todo:
                self._wake.clear()
                await self._wake.wait()
                continue
            action = self.todo[0]
            try:
                await self._perform(action)
            except (GcpError, _NotDone) as exc:
                self._fault_once(f"{action_name(action)} did not get through: {exc}")
                if action.open:
                    # Kept at the head: the car waits for it (until it expires, or its entry is settled).
                    self._wake.clear()
                    await self._clock.wait(self._wake, RETRY_S)
                    continue
                # SET_MODE comes again from the next STATUS that shows another mode; a CLOSE is only ever a nicety.
            if self.todo and self.todo[0] is action:
                self.todo.popleft()
            self._idle_sign()

    async def _perform(self, action: GateAction) -> None:
        controller = self.controller
        assert controller is not None
        if action.mode is not None:
            self._mode_sent_at = self._clock.monotonic()
            result = await controller.set_mode(MODES[action.mode])
            if result != AckResult.OK:
                raise _NotDone(f"SET_MODE answered {result.name}")
            self._succeeded()
        if action.open:
            if action.expires is not None and self._timeline.now() >= action.expires:
                log.info("lane.open_expired", gate=self.gate, session=action.session_id)
                self._done(action)
                return
            if not self.online:
                raise _NotDone("the controller is offline")
            result = await controller.open_barrier()
            if result != AckResult.OK:
                raise _NotDone(f"OPEN answered {result.name}")
            self.opens += 1
            self._succeeded()
            self._done(action)
            if self.barrier in (None, Barrier.CLOSED, Barrier.CLOSING):
                self.barrier = Barrier.OPENING  # as the next STATUS will say
                self._changed()
        if action.close:
            await self._close_if_clear(controller)
        if action.display is not None:
            try:
                if await controller.display(action.display) == AckResult.OK:
                    self.sign = action.display
                    if action.display not in (SIGN_FULL, *SIGN_IDLE.values()):
                        # A decision's sign (the slot, what is due) stays up for the driver to read.
                        self._sign_until = self._clock.monotonic() + SIGN_HOLD_S
            except GcpError as exc:
                # A sign is news of the moment: not worth a retry, the next car's decision shows its own.
                log.warning("lane.display_failed", gate=self.gate, error=str(exc))

    async def _close_if_clear(self, controller: Controller) -> None:
        """CLOSE after a back-out, only with both loops clear by the lane's view and by a fresh PING."""
        if self.loops or not self.online:
            return
        try:
            fresh = await controller.ping()
        except GcpError:
            return  # nothing fresh to go by: leave it to the controller's own close after its hold
        if fresh.loops or self.loops or fresh.barrier not in (Barrier.OPEN, Barrier.OPENING):
            return
        self.closes += 1
        await controller.close_barrier()

    def _done(self, action: GateAction) -> None:
        if action.pending is not None:
            self._spawn(self._actuated(action.pending))

    async def _actuated(self, pending: int) -> None:
        # Lost with a crash, the row makes the OPEN go out once more after the restart: harmless, and rare.
        with contextlib.suppress(WriterClosed):
            await self._writer.submit(GateActuated((pending,)))

    def _succeeded(self) -> None:
        self._faulted = False

    def _fault_once(self, message: str) -> None:
        if not self._faulted and self.online is True:
            self._faulted = True
            self._alert("gate.fault", "critical", message)
        log.warning("lane.command_failed", gate=self.gate, error=message)

    async def _watch_open(self) -> None:
        while True:
            self._open_changed.clear()
            since = self._open_since
            if since is None or self._open_alerted:
                await self._open_changed.wait()
                continue
            left = since + self.open_too_long - self._clock.monotonic()
            if left > 0:
                await self._clock.wait(self._open_changed, left)
                continue
            self._open_alerted = True
            self._alert("gate.open_too_long", "warning", f"the barrier has been open for {self.open_too_long:.0f} s")

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _alert(self, code: str, severity: Literal["info", "warning", "critical"], message: str) -> None:
        self._spawn(self._submit_alert(GateAlert(self.gate, code, severity, message)))

    async def _submit_alert(self, alert: GateAlert) -> Reply | None:
        with contextlib.suppress(WriterClosed):
            return await self._writer.submit(alert)
        return None

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        if self.stopping:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def action_name(action: GateAction) -> str:
    return "OPEN" if action.open else "SET_MODE" if action.mode is not None else "CLOSE" if action.close else "DISPLAY"


__all__ = ["BARRIER_NAMES", "MODES", "MODE_NAMES", "OPEN_TOO_LONG_S", "Lane", "sign_text"]
