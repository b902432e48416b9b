"""The lanes service: one GCP/1 link per configured serial port, one `Lane` per gate with a barrier controller.

Fed by the writer's commits: the actions a decision asks of a barrier (`Committed.actions`), settled entries
(an OPEN still queued for them is dropped), modes asked for, and slot changes (a lot's entry signs show `FULL`
while no slot is left for a walk-in). At start it takes up the OPENs the store still holds (decided, never
acknowledged: a crash, an unplugged cable) and the modes asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import structlog

from drivers.gcp1 import GcpLink, Mode
from gateway.config import GatewayConfig
from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.domain import OpenGate
from gateway.core.events import GateMode, SessionCancelled, SessionConfirmed, SlotStatus
from gateway.mqtt.inbound import Handled
from gateway.mqtt.topics import Topics
from gateway.services.lanes.lane import MODE_NAMES, MODES, OPEN_TOO_LONG_S, Lane
from gateway.store.reads import ReadStore
from gateway.store.writer import Committed, Writer, WriterClosed

log = structlog.get_logger("gateway.lanes")

HA_ACTOR = "homeassistant"


class Board(Protocol):
    """Where lanes publish their retained state and learn how full a lot is (the publisher)."""

    def retain(self, topic: str, payload: bytes) -> None: ...

    def walk_in_available(self, lot: str, restricted: frozenset[str]) -> int: ...


class Lanes:
    name = "lanes"

    def __init__(
        self,
        config: GatewayConfig,
        writer: Writer,
        reads: ReadStore,
        publisher: Board,
        topics: Topics,
        *,
        clock: Clock = SYSTEM_CLOCK,
        open_too_long: float = OPEN_TOO_LONG_S,
    ) -> None:
        self._writer = writer
        self._reads = reads
        self._publisher = publisher
        self._restricted = frozenset(config.access.restricted_types)
        self.links: dict[str, GcpLink] = {}
        self.lanes: dict[str, Lane] = {}
        self.unknown_opens = 0
        self._tasks: set[asyncio.Task[bool]] = set()
        for gate in config.gates:
            if gate.serial is None:
                continue
            link = self.links.get(gate.serial.port)
            if link is None:
                link = self.links[gate.serial.port] = GcpLink(gate.serial.port, baudrate=gate.serial.baudrate)
            lane = Lane(
                gate,
                writer,
                publisher.retain,
                topics.gate(gate.id),
                clock=clock,
                timeline=writer.timeline,
                open_too_long=open_too_long,
            )
            lane.controller = link.add_controller(
                gate.serial.address, on_event=lane.on_event, on_online=lane.on_online, on_status=lane.on_status
            )
            self.lanes[gate.id] = lane
        self._by_lot: dict[str, list[Lane]] = {}
        for lane in self.lanes.values():
            if lane.direction == "entry":
                self._by_lot.setdefault(lane.lot, []).append(lane)

    async def start(self) -> None:
        """Take up what the store holds, follow the commits, start opening the serial ports (in the background)."""
        modes = await self._reads.gate_modes()
        for gate, lane in self.lanes.items():
            lane.desired_mode = MODE_NAMES[MODES.get(modes.get(gate, "normal"), Mode.NORMAL)]
        for action in await self._reads.gate_actions():
            if action.gate in self.lanes:
                self.lanes[action.gate].enqueue(action)
        self._writer.add_listener(self.on_commit)
        self._signs(set(self._by_lot))
        for lane in self.lanes.values():
            lane.start()  # `offline` until its controller is heard
        for link in self.links.values():
            await link.start()

    async def run(self) -> None:
        if self.lanes:
            await asyncio.gather(*(lane.run() for lane in self.lanes.values()))

    async def stop(self) -> None:
        self._writer.remove_listener(self.on_commit)
        for lane in self.lanes.values():
            lane.stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            await link.close()
        for lane in self.lanes.values():
            await lane.stop()

    async def health(self) -> dict[str, Any]:
        return {
            "gates": {gate: lane.health() for gate, lane in self.lanes.items()},
            "links": {port: {"open": link.connected, **vars(link.stats)} for port, link in self.links.items()},
            "unknown_opens": self.unknown_opens,
        }

    def on_commit(self, done: Committed) -> None:
        """Writer listener (in the loop, after COMMIT, never blocks)."""
        lots: set[str] = set()
        for envelope in done.events:
            match envelope.event:
                case SessionConfirmed(session_id=sid) | SessionCancelled(session_id=sid):
                    for lane in self.lanes.values():
                        lane.forget(sid)
                case GateMode(gate=gate, mode=mode) if gate in self.lanes:
                    self.lanes[gate].desired_mode = mode
                case SlotStatus(lot=lot) if lot in self._by_lot:
                    lots.add(lot)
        for action in done.actions:
            if action.gate in self.lanes:
                self.lanes[action.gate].enqueue(action)
        if lots:
            self._signs(lots)

    def _signs(self, lots: set[str]) -> None:
        for lot in lots:
            full = self._publisher.walk_in_available(lot, self._restricted) == 0
            for lane in self._by_lot.get(lot, ()):
                lane.set_full(full)

    async def handle_open(self, gate: str) -> Handled:
        """`R/gates/<gate>/open` (contract §3.4): one manual open by Home Assistant per message; a future that
        resolves once it is committed (the message is acknowledged then)."""
        if gate not in self.lanes:
            self.unknown_opens += 1
            log.warning("lanes.open_unknown_gate", gate=gate[:64])
            return None
        task = asyncio.get_running_loop().create_task(self._open(gate))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open(self, gate: str) -> bool:
        with contextlib.suppress(WriterClosed):
            reply = await self._writer.submit(OpenGate(gate=gate, actor=HA_ACTOR, note=None), urgent=True)
            if not reply.ok:
                log.warning("lanes.open_refused", gate=gate, code=reply.code, message=reply.message)
            return True
        return False
