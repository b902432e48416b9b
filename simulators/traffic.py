"""A traffic scenario: cars arrive, are read at an entry camera, park, dwell, leave and are read at an exit.

The scenario learns the gateway's decisions only from the event stream (`<topic_root>/<gateway_id>/events`,
contract §4): `session.started` / `entry.denied` for the car waiting longest at that entry gate,
`session.ended` / `exit.unmatched` for the car at that exit gate. At a gate with a simulated barrier controller
(`barriers`, by gate id) cars queue one at a time: onto loop A, the camera reads the plate, and once the gateway
has decided the car waits for the barrier to open (the gateway's OPEN on the serial line) and drives over loops A
and B; the controller closes by itself behind it. A car refused or never let through backs out; an exit refused
for payment (the sign says `PAY ...`, contract §6 under `deny`) pays at the pay station and is read again; an
unmatched exit is let out by the attendant (`open_gate`). Some cars book ahead (`reserve`, and a share of
those never come), some pay at a pay station before leaving (`quote`, then `pay` what is due): requests on
`<topic_root>/<gateway_id>/request/<verb>`, answered on `.../response/<verb>` (contract §3.3).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt

from simulators.barrier import BarrierSim, BarrierState, wire
from simulators.cameras import PlateCamera, random_plate
from simulators.sensors import SensorFleet

Event = dict[str, Any]

STAT_KEYS = (
    "arrivals",
    "entered",
    "denied",
    "no_decision",
    "parked",
    "wrong_slot",
    "no_space",
    "vacated",
    "exit_reads",
    "left",
    "unmatched",
    "exit_no_decision",
    "reserved",
    "reserve_refused",
    "no_show",
    "paid",
    "paid_amount",
    "pay_failed",
    "entry_passed",
    "exit_passed",
    "backed_out",
    "pay_at_exit",
    "attendant_opens",
)
REQUEST_TIMEOUT_S = 10.0
PAY_SIGN = "sign.pay"  # not a gateway event: the exit sign asking for payment, as the driver sees it
PAY_ATTEMPTS = 2  # an exit refused for payment pays and is read again at most this often, then the attendant


def rush_hours(epoch: float) -> float:
    """A time-of-day multiplier for the arrival rate: quiet nights, morning and evening peaks."""
    local = time.localtime(epoch)
    hour = local.tm_hour + local.tm_min / 60
    peaks = math.exp(-(((hour - 8.5) / 1.5) ** 2)) + 0.8 * math.exp(-(((hour - 17.5) / 2.0) ** 2))
    return 0.1 + 1.5 * peaks


@dataclass(frozen=True)
class TrafficOptions:
    """What the scenario drives; durations in seconds, ranges as (low, high) for a uniform draw.

    `gate_by_camera` maps a camera id to the gate it watches (a camera missing from it is taken as its
    own gate id). `max_arrivals` ends the run once that many cars came and all of them are done.
    `rate_curve`, given the wall-clock time, multiplies `arrivals_per_min` (e.g. `rush_hours`).
    """

    lot: str
    entry_cameras: list[str]
    exit_cameras: list[str]
    sensor_ids_by_slot: dict[str, str]
    gate_by_camera: dict[str, str] = field(default_factory=dict)
    arrivals_per_min: float = 20
    dwell_s: tuple[float, float] = (5, 40)
    wrong_slot_share: float = 0.1
    topic_root: str = "parking"
    gateway_id: str = "demo"
    seed: int = 1
    park_delay_s: tuple[float, float] = (1, 4)
    exit_delay_s: tuple[float, float] = (1, 3)
    decision_timeout_s: float = 30
    max_arrivals: int | None = None
    rate_curve: Callable[[float], float] | None = None
    # Reservations: this share of cars books first, `reserve_lead_s` ahead of its arrival; of those, this
    # share never comes. Payment: this share of cars pays what is due at a pay station before the exit.
    reservation_share: float = 0.0
    no_show_share: float = 0.0
    reserve_lead_s: tuple[float, float] = (5, 15)
    pay_share: float = 0.0
    # Before the first car the attendant opens every barrier once by hand (`open_gate`), as at a shift's start.
    barrier_check: bool = False


@dataclass
class _Waiting:
    plate: str
    decision: asyncio.Future[Event]
    session_id: str | None = None


class TrafficScenario:
    """Runs cars through the lot; `stats` counts what happened to them."""

    def __init__(
        self,
        client: aiomqtt.Client,
        fleet: SensorFleet,
        cameras: dict[str, PlateCamera],
        options: TrafficOptions,
        barriers: Mapping[str, BarrierSim] | None = None,
    ) -> None:
        missing = [c for c in (*options.entry_cameras, *options.exit_cameras) if c not in cameras]
        if missing:
            raise ValueError(f"no PlateCamera for {', '.join(missing)}")
        if not options.entry_cameras or not options.exit_cameras:
            raise ValueError("a traffic scenario needs at least one entry and one exit camera")
        unknown = sorted(set(options.sensor_ids_by_slot.values()) - set(fleet.sensors))
        if unknown:
            raise ValueError(f"sensors not in the fleet: {', '.join(unknown)}")
        self.client = client
        self.fleet = fleet
        self.cameras = cameras
        self.options = options
        self.barriers = dict(barriers or {})
        # One car at a time on a barrier lane's loops: the others queue behind it (asyncio.Lock is FIFO).
        self._lanes = {gate: asyncio.Lock() for gate in self.barriers}
        self.root = f"{options.topic_root}/{options.gateway_id}"
        self.events_topic = f"{self.root}/events"
        self.responses_topic = f"{self.root}/response/+"
        self._requests: dict[str, asyncio.Future[Event]] = {}
        self.rng = random.Random(options.seed)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._entries: dict[str, deque[_Waiting]] = {}
        self._exits: dict[str, deque[_Waiting]] = {}
        # Slots the simulator has made occupied, and slots promised to cars still driving to them.
        self._occupied: set[str] = set()
        self._claimed: set[str] = set()
        self._plates: set[str] = set()
        self._cars: set[asyncio.Task[None]] = set()

    def gate_of(self, camera_id: str) -> str:
        return self.options.gate_by_camera.get(camera_id, camera_id)

    async def run(self, duration: float | None) -> None:
        """Run until `duration` seconds passed (None: no limit), or `max_arrivals` cars are done."""
        await self.client.subscribe(self.events_topic, qos=1)
        await self.client.subscribe(self.responses_topic, qos=1)
        deadline = asyncio.timeout(duration)
        try:
            async with deadline, asyncio.TaskGroup() as tg:
                listener = tg.create_task(self._listen())
                if self.options.barrier_check:
                    await self._check_barriers()
                await self._arrivals(tg)
                while self._cars:
                    await asyncio.wait(set(self._cars))
                listener.cancel()
        except TimeoutError:
            if not deadline.expired():
                raise
        await self.client.unsubscribe(self.events_topic)
        await self.client.unsubscribe(self.responses_topic)

    async def _check_barriers(self) -> None:
        body = {"reason": "shift start: barrier check", "actor": "attendant"}
        replies = await asyncio.gather(*(self.request("open_gate", {"gate": g, **body}) for g in self.barriers))
        self.stats["attendant_opens"] += sum(1 for r in replies if r is not None and r.get("status") == "ok")

    async def _arrivals(self, tg: asyncio.TaskGroup) -> None:
        opts = self.options
        base_rate = opts.arrivals_per_min / 60
        while opts.max_arrivals is None or self.stats["arrivals"] < opts.max_arrivals:
            rate = base_rate * (opts.rate_curve(time.time()) if opts.rate_curve else 1.0)
            if rate <= 0:
                await asyncio.sleep(1.0)
                continue
            await asyncio.sleep(self.rng.expovariate(rate))
            self.stats["arrivals"] += 1
            task = tg.create_task(self._car(self._new_plate()))
            self._cars.add(task)
            task.add_done_callback(self._cars.discard)

    def _new_plate(self) -> str:
        while True:
            plate = random_plate(self.rng)
            if plate not in self._plates:
                self._plates.add(plate)
                return plate

    async def _decision(self, queue: deque[_Waiting], waiting: _Waiting, camera: str) -> Event | None:
        """Read the plate at `camera` and wait for the gateway's answer; None after the timeout."""
        queue.append(waiting)
        try:
            await self.cameras[camera].read(waiting.plate)
            return await asyncio.wait_for(waiting.decision, self.options.decision_timeout_s)
        except TimeoutError:
            return None
        finally:
            if waiting in queue:
                queue.remove(waiting)

    async def _enter(self, camera: str, waiting: _Waiting) -> Event | None:
        """The entry decision; at a barrier lane the car also gets through, or backs out (then None)."""
        gate = self.gate_of(camera)
        queue = self._entries.setdefault(gate, deque())
        sim = self.barriers.get(gate)
        if sim is None:
            return await self._decision(queue, waiting, camera)
        async with self._lanes[gate]:
            sim.vehicle_arrives()
            decision = await self._decision(queue, waiting, camera)
            if decision is not None and decision["type"] == "session.started":
                if await self._drive_through(sim):
                    self.stats["entry_passed"] += 1
                    return decision
                decision = None  # the barrier never opened: the gateway cancels the entry at the back-out
            sim.vehicle_backs_out()
            self.stats["backed_out"] += 1
            return decision

    async def _leave(self, camera: str, waiting: _Waiting) -> Event | None:
        """The exit decision; at a barrier lane the car also gets out (paying or helped by the attendant)."""
        gate = self.gate_of(camera)
        queue = self._exits.setdefault(gate, deque())
        sim = self.barriers.get(gate)
        if sim is None:
            return await self._decision(queue, waiting, camera)
        async with self._lanes[gate]:
            sim.vehicle_arrives()
            decision = await self._barrier_exit(sim, queue, waiting, camera)
            if decision is None or decision["type"] != "session.ended":
                # Nobody decided to let this car out, yet it cannot stay on the loop: the attendant opens.
                body = {"gate": gate, "reason": "attendant: exit not decided", "actor": "attendant"}
                await self.request("open_gate", body)
                self.stats["attendant_opens"] += 1
            if await self._drive_through(sim):
                self.stats["exit_passed"] += 1
            else:
                sim.vehicle_backs_out()
                self.stats["backed_out"] += 1
            return decision

    async def _barrier_exit(
        self, sim: BarrierSim, queue: deque[_Waiting], waiting: _Waiting, camera: str
    ) -> Event | None:
        """Read at an exit barrier until decided. A refusal for payment shows only on the sign (`PAY 3.00 EUR`):
        then the driver pays what is due at the pay station and the camera reads the plate again."""
        loop = asyncio.get_running_loop()
        for attempt in range(PAY_ATTEMPTS + 1):
            sign = loop.create_task(self._pay_sign(sim, len(sim.received), waiting.decision))
            try:
                decision = await self._decision(queue, waiting, camera)
            finally:
                sign.cancel()
            if decision is None or decision["type"] != PAY_SIGN:
                return decision
            self.stats["pay_at_exit"] += 1
            if waiting.session_id is None or attempt == PAY_ATTEMPTS:
                break
            await self._pay(waiting.session_id)
            waiting.decision = loop.create_future()
        return None

    @staticmethod
    async def _pay_sign(sim: BarrierSim, mark: int, decision: asyncio.Future[Event]) -> None:
        """What the driver sees: the sign asks for payment (a DISPLAY `PAY ...` after `mark`) — as a decision."""

        def asked() -> bool:
            return any(c.cmd == wire.DISPLAY and c.payload.startswith(b"PAY ") for c in sim.received[mark:])

        await sim.wait_until(asked)
        if not decision.done():
            decision.set_result({"type": PAY_SIGN, "sign": sim.display_text})

    async def _drive_through(self, sim: BarrierSim) -> bool:
        """Wait for the barrier to be open, then over loops A and B; False when it does not open in time."""
        if not await sim.wait_until(lambda: sim.barrier == BarrierState.OPEN, self.options.decision_timeout_s):
            return False
        await sim.vehicle_passes()
        return True

    async def _car(self, plate: str) -> None:
        try:
            await self._visit(plate)
        finally:
            self._plates.discard(plate)

    async def request(self, verb: str, body: dict[str, Any]) -> Event | None:
        """A request to the gateway; its reply, or None after the timeout."""
        transaction = uuid.uuid4().hex
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._requests[transaction] = fut
        try:
            payload = json.dumps({"transaction": transaction, **body})
            await self.client.publish(f"{self.root}/request/{verb}", payload, qos=1)
            return await asyncio.wait_for(fut, REQUEST_TIMEOUT_S)
        except TimeoutError:
            return None
        finally:
            self._requests.pop(transaction, None)

    async def _book(self, plate: str) -> bool:
        """Reserve ahead and drive there in time; False when the car turns out to be a no-show."""
        opts, rng = self.options, self.rng
        lead = rng.uniform(*opts.reserve_lead_s)
        start = time.time() + lead
        end = start + opts.dwell_s[1] + opts.park_delay_s[1] + opts.exit_delay_s[1] + 60
        reply = await self.request(
            "reserve",
            {"reservation_id": f"res-{uuid.uuid4().hex[:12]}", "vehicle": plate, "lot": opts.lot,
             "start": _rfc3339(start), "end": _rfc3339(end)},
        )  # fmt: skip
        if reply is None or reply.get("status") != "ok":
            self.stats["reserve_refused"] += 1
            return True  # comes anyway, as a walk-in
        self.stats["reserved"] += 1
        if rng.random() < opts.no_show_share:
            self.stats["no_show"] += 1
            return False
        await asyncio.sleep(lead)
        return True

    async def _pay(self, session_id: str) -> None:
        """At the pay station: what is due, then pay exactly that."""
        quote = await self.request("quote", {"session_id": session_id})
        data = quote.get("data") if quote and quote.get("status") == "ok" else None
        if not isinstance(data, dict) or not isinstance(data.get("due"), int):
            self.stats["pay_failed"] += 1
            return
        paid = await self.request(
            "pay", {"session_id": session_id, "amount": data["due"], "payment_ref": f"pos-{uuid.uuid4().hex[:12]}"}
        )
        if paid is None or paid.get("status") != "ok":
            self.stats["pay_failed"] += 1
            return
        self.stats["paid"] += 1
        self.stats["paid_amount"] += data["due"]

    async def _visit(self, plate: str) -> None:
        opts, rng, loop = self.options, self.rng, asyncio.get_running_loop()
        if rng.random() < opts.reservation_share and not await self._book(plate):
            return
        entry = _Waiting(plate, loop.create_future())
        started = await self._enter(rng.choice(opts.entry_cameras), entry)
        if started is None:
            self.stats["no_decision"] += 1
            return
        if started["type"] == "entry.denied":
            self.stats["denied"] += 1
            return
        self.stats["entered"] += 1
        assigned = started.get("slot") if isinstance(started.get("slot"), str) else None
        if assigned is not None:
            self._claimed.add(assigned)
        try:
            await asyncio.sleep(rng.uniform(*opts.park_delay_s))
        finally:
            if assigned is not None:
                self._claimed.discard(assigned)
        slot = self._choose_slot(assigned)
        if slot is not None:
            sensor = opts.sensor_ids_by_slot[slot]
            self._occupied.add(slot)
            try:
                await self.fleet.set_state(sensor, True)
                self.stats["parked"] += 1
                await asyncio.sleep(rng.uniform(*opts.dwell_s))
                await self.fleet.set_state(sensor, False)
                self.stats["vacated"] += 1
            finally:
                self._occupied.discard(slot)
        else:
            await asyncio.sleep(rng.uniform(*opts.dwell_s))
        session_id = started.get("session_id")
        if isinstance(session_id, str) and rng.random() < opts.pay_share:
            await self._pay(session_id)
        await asyncio.sleep(rng.uniform(*opts.exit_delay_s))
        leaving = _Waiting(plate, loop.create_future(), started.get("session_id"))
        self.stats["exit_reads"] += 1
        ended = await self._leave(rng.choice(opts.exit_cameras), leaving)
        if ended is None:
            self.stats["exit_no_decision"] += 1
        elif ended["type"] == "exit.unmatched":
            self.stats["unmatched"] += 1
        else:
            self.stats["left"] += 1

    def _choose_slot(self, assigned: str | None) -> str | None:
        """The assigned slot, or (wrong_slot_share, or when it is taken) another one believed vacant."""
        known = self.options.sensor_ids_by_slot
        free = sorted(s for s in known if s not in self._occupied and s not in self._claimed)
        assigned_free = assigned in known and assigned not in self._occupied
        if assigned_free and self.rng.random() >= self.options.wrong_slot_share:
            return assigned
        others = [s for s in free if s != assigned]
        if others:
            self.stats["wrong_slot"] += 1
            return self.rng.choice(others)
        if assigned_free:
            return assigned
        self.stats["no_space"] += 1
        return None

    async def _listen(self) -> None:
        async for message in self.client.messages:
            if not isinstance(message.payload, bytes):
                continue
            try:
                doc = json.loads(message.payload)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if message.topic.matches(self.events_topic):
                self.on_event(doc)
            elif message.topic.matches(self.responses_topic):
                fut = self._requests.get(str(doc.get("transaction")))
                if fut is not None and not fut.done():
                    fut.set_result(doc)

    def on_event(self, event: Event) -> None:
        """Hand a gateway event to the car it answers, if any car is waiting for it."""
        kind, gate = event.get("type"), event.get("gate")
        if not isinstance(gate, str):
            return
        if kind in ("session.started", "entry.denied"):
            self._resolve(self._entries.get(gate), event)
        elif kind in ("session.ended", "exit.unmatched"):
            self._resolve(self._exits.get(gate), event)

    @staticmethod
    def _resolve(queue: deque[_Waiting] | None, event: Event) -> None:
        waiting = [w for w in queue or () if not w.decision.done()]
        if not waiting:
            return
        # Prefer an exact match (session id, or the plate when the gateway publishes plates); else FIFO.
        match = next(
            (
                w
                for w in waiting
                if (w.session_id is not None and w.session_id == event.get("session_id"))
                or w.plate == event.get("vehicle")
            ),
            waiting[0],
        )
        match.decision.set_result(event)


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
