"""Device messages in: topic -> driver -> typed observation -> sensor tracker or writer command.

Bad input is counted per (source, reason), logged at most once per source per minute, and kept in the store
(the last N, via the writer). It never reaches a decision; nor does a retained camera read (contract §3 v1.2).
`handle` tells the MQTT link when a message may be acknowledged: a sensor message once the tracker has it,
a camera read once its decision is committed.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import structlog

from drivers.json_camera import parse_json_camera
from drivers.json_sensor import parse_json_sensor
from drivers.observations import PlateRead, Rejected, SensorObservation
from drivers.platerecognizer import parse_platerecognizer
from drivers.tts import parse_tts_uplink
from gateway.config import GateConfig, GatewayConfig, IngressKind
from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.domain import (
    BatteryReport,
    Command,
    Enter,
    Exit,
    RaiseAlert,
    RecordRejections,
    Reply,
    SensorChange,
    SensorChanges,
    SensorsSeen,
)
from gateway.core.events import SlotStatus
from gateway.core.plates import PlateError, normalise, reread_key
from gateway.core.reconcile import OFFLINE, battery_verdict, offline_pad, offline_slack
from gateway.core.sensors import SensorTracker, Transition, Verdict
from gateway.mqtt.inbound import Handled
from gateway.mqtt.link import Incoming
from gateway.mqtt.topics import device_level, match
from gateway.store.reads import ReadStore
from gateway.store.writer import Committed, Writer, WriterClosed

log = structlog.get_logger("gateway.ingress")

UNKNOWN_ALERT_EVERY = 3600.0
LOG_EVERY = 60.0
DETAIL_MAX = 200
MAX_TRACKED_SOURCES = 10_000
MAX_IN_FLIGHT = 1024  # commands handed to the writer and not yet committed
SENSOR_BATCH = 128  # debounced transitions per writer command: one task, one future, one savepoint for many
DECISIONS = ("cameras", "platerecognizer")  # ingress kinds whose messages are decisions
# A decision holds the MQTT receive loop until it is committed and the lane has sent its OPEN, at most this long:
# the sensor messages behind it would otherwise compete with it for the one CPU the loop and writer share.
DECISION_HOLD_S = 0.25
SEEN_BATCH = 512  # offline deadlines per writer command


@dataclass(frozen=True, slots=True)
class Route:
    topic_filter: str
    kind: IngressKind


class Ingress:
    """Owns the sensor tracker and the counters; the MQTT link hands it every device message."""

    name = "ingress"

    def __init__(self, config: GatewayConfig, writer: Writer, reads: ReadStore, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._writer = writer
        self._reads = reads
        self._clock = clock
        self.routes = [Route(f, kind) for kind, filters in config.ingress.by_kind() for f in filters]
        specs = config.slot_specs()
        self._sensor_of = {spec.id: spec.sensor for spec in specs}
        self.gates: dict[str, GateConfig] = {g.camera: g for g in config.gates if g.camera is not None}
        self.tracker = SensorTracker(
            debounce=config.timing.debounce,
            offline_after=config.timing.sensor_offline_after,
            offline_overrides={s.sensor: s.offline_after for s in specs if s.offline_after is not None},
        )
        # Offline deadlines in the store (gateway/core/reconcile.py): what we know is stored, and what to write.
        self._flush_every = config.timing.sensor_seen_flush
        self._pad = offline_pad(self._flush_every)
        self._slack = offline_slack(self._flush_every)
        self._stored: dict[str, float] = {}
        self._to_store: dict[str, tuple[float, float]] = {}  # sensor -> (last heard, memory's deadline)
        self._stopped = False
        # Battery: the threshold per sensor, and what is known (low, when last alerted on the Timeline).
        self._battery_low_at = {s.sensor: s.battery_low or config.sensors.battery_low for s in specs}
        # The configured sensors: the keys above, not a set of their own (512 KiB at 10,000 slots).
        self.sensors = self._battery_low_at.keys()
        self._battery: dict[str, tuple[bool, float | None]] = {}
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        self.verdicts: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        self._pending_rejections: list[tuple[float, str, str, str]] = []
        self._unknown_alerted: dict[str, float] = {}
        self._last_logged: dict[str, float] = {}
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._pending: deque[Command] = deque()
        # The tracker's transitions behind each SensorChanges on its way to the writer (by id: the command lives
        # in _pending or its task until settled).
        self._transitions: dict[int, list[Transition]] = {}
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    @property
    def subscriptions(self) -> tuple[tuple[str, int], ...]:
        return tuple((r.topic_filter, 1) for r in self.routes)

    @property
    def decision_topics(self) -> tuple[str, ...]:
        """The filters whose messages are decisions: the MQTT link hands them over ahead of sensor traffic."""
        return tuple(r.topic_filter for r in self.routes if r.kind in DECISIONS)

    async def start(self) -> None:
        """Seed the tracker with the committed sensor states, so a restart does not re-emit what is known."""
        for sensor, occupied in await self._reads.sensor_states():
            self.tracker.seed(sensor, occupied)
        for sensor, alerted in await self._reads.battery_alerts():
            self._battery[sensor] = (True, alerted)
        self._stored = await self._reads.deadlines(OFFLINE)
        self._writer.add_listener(self._on_commit)

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._writer.remove_listener(self._on_commit)
            await self._flush_exact()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_commit(self, done: Committed) -> None:
        for envelope in done.events:
            match envelope.event:
                case SlotStatus(slot=slot_id, sensor="offline", reason="sensor.offline"):
                    # Also after a deadline from the store fired it: the next report is a transition again.
                    sensor = self._sensor_of.get(slot_id)
                    if sensor is not None:
                        self.tracker.mark_offline(sensor)
                        self._stored.pop(sensor, None)
                        self._to_store.pop(sensor, None)
                case _:
                    pass

    def _timer(self, mono: float) -> float:
        """A monotonic reading as the writer's Timeline time (what stored deadlines are measured in)."""
        return self._writer.timeline.now() - (self._clock.monotonic() - mono)

    async def health(self) -> dict[str, Any]:
        return {
            "accepted": dict(self.accepted),
            "rejected": {f"{k}/{r}": n for (k, r), n in sorted(self.rejected.items())},
            "sensor_messages": dict(self.verdicts),
            "decisions": dict(self.decisions),
        }

    async def handle(self, msg: Incoming) -> Handled:
        """None once the message is handled; for a camera read, a future that resolves once it is committed."""
        # Wall time judges device timestamps and is what the rejection log records; timers run on monotonic.
        now = self._clock.wall()
        mono = self._clock.monotonic()
        for route in self.routes:
            levels = match(route.topic_filter, msg.topic)
            if levels is None or not levels:
                continue
            device = levels[device_level(route.kind)]
            try:
                if msg.retain and route.kind in DECISIONS:
                    # A broker's stored copy of an old read: acting on it would open a barrier for nobody.
                    raise Rejected("retained", "a retained camera read is never a decision")
                self._dispatch(route.kind, device, msg.payload, now, mono)
            except Rejected as exc:
                self._reject(route.kind, device, exc.reason, exc.detail, now, mono)
            decisions = [task for cmd, task in await self._submit_pending() if isinstance(cmd, Enter | Exit)]
            if decisions:
                await asyncio.wait(decisions, timeout=DECISION_HOLD_S)
            return _all(decisions)
        return None

    def reject(self, kind: str, device: str, reason: str, detail: str) -> None:
        """Count, log and record a rejected input that did not come through `handle` (a retained request)."""
        self._reject(kind, device, reason, detail, self._clock.wall(), self._clock.monotonic())

    def _dispatch(self, kind: IngressKind, device: str, payload: bytes, now: float, mono: float) -> None:
        if kind == "sensors":
            self._sensor(parse_json_sensor(device, payload, now=now), mono)
        elif kind == "tts":
            self._sensor(parse_tts_uplink(device, payload, now=now), mono)
        elif kind == "cameras":
            self._plate(parse_json_camera(device, payload, now=now), mono)
        else:
            best = parse_platerecognizer(device, payload, now=now)
            if best is not None:
                self._plate(best, mono)

    def _sensor(self, obs: SensorObservation, mono: float) -> None:
        if obs.sensor_id not in self.sensors:
            self._unknown(obs.sensor_id, mono)
            raise Rejected("unknown_device", f"sensor {obs.sensor_id!r} is not configured")
        verdict = self.tracker.observe(obs, mono)
        self.verdicts[verdict.value] += 1
        if verdict in (Verdict.ACCEPTED, Verdict.REBOOT):
            self.accepted[obs.source] += 1
            self._wakeup.set()
            self._seen(obs.sensor_id, mono)
            if obs.battery is not None:
                self._battery_reading(obs.sensor_id, obs.battery, mono)

    def _seen(self, sensor: str, mono: float) -> None:
        """Heartbeats stay in memory; the stored offline deadline moves only when the memory's nears it."""
        after = self.tracker.offline_after(sensor)
        if after is None:
            return
        seen = self._timer(mono)
        due = seen + after
        stored = self._stored.get(sensor)
        if stored is not None and due <= stored - self._slack:
            return
        self._to_store[sensor] = (seen, due)
        if stored is not None and stored - self._timer(mono) < self._slack:
            # Silent for nearly offline_after (or heard first after a restart): the stored deadline is close.
            self._pending.append(self._store_deadlines([sensor]))

    def _store_deadlines(self, sensors: list[str], *, exact: bool = False) -> SensorsSeen:
        pad = 0.0 if exact else self._pad
        deadlines = tuple((s, seen, due + pad) for s in sensors for seen, due in [self._to_store.pop(s)])
        self._stored.update((s, due) for s, _, due in deadlines)
        return SensorsSeen(deadlines=deadlines)

    async def _flush_exact(self) -> None:
        """At a clean stop: every heard sensor's exact deadline, so a restart keeps each countdown to the second."""
        for sensor in self.sensors:
            seen, after = self.tracker.last_seen(sensor), self.tracker.offline_after(sensor)
            if seen is not None and after is not None and not self.tracker.is_silent(sensor):
                self._to_store[sensor] = (self._timer(seen), self._timer(seen) + after)
        if not self._to_store:
            return
        try:
            await self._writer.submit(self._store_deadlines(list(self._to_store), exact=True))
        except WriterClosed:
            pass

    def _battery_reading(self, sensor: str, volts: float, mono: float) -> None:
        threshold = self._battery_low_at[sensor]
        low, alerted = self._battery.get(sensor, (False, None))
        now = self._timer(mono)
        verdict = battery_verdict(volts, threshold, low=low, alerted_at=alerted, now=now)
        if verdict is None:
            return
        self._battery[sensor] = (True, now) if verdict == "low" else (False, None)
        self._pending.append(BatteryReport(sensor=sensor, volts=volts, threshold=threshold, low=verdict == "low"))

    def _plate(self, read: PlateRead, mono: float) -> None:
        gate = self.gates.get(read.camera_id)
        if gate is None:
            self._unknown(read.camera_id, mono)
            raise Rejected("unknown_device", f"camera {read.camera_id!r} is not at a configured gate")
        try:
            plate = normalise(read.plate)
        except PlateError as exc:
            raise Rejected("bad_plate", str(exc)) from None
        self.accepted["camera"] += 1
        keys = {
            "idempotency_key": f"cam:{read.camera_id}:{read.event_id}",
            "reread_key": reread_key(gate.id, plate),
        }
        cmd: Command
        if gate.direction == "entry":
            cmd = Enter(vehicle=plate, gate=gate.id, arriving=self.tracker.arriving(), **keys)
        else:
            cmd = Exit(vehicle=plate, gate=gate.id, candidates=read.candidates, **keys)
        self._pending.append(cmd)

    def _unknown(self, device: str, mono: float) -> None:
        if len(self._unknown_alerted) > MAX_TRACKED_SOURCES:
            self._unknown_alerted.clear()
        last = self._unknown_alerted.get(device)
        if last is not None and mono - last < UNKNOWN_ALERT_EVERY:
            return
        self._unknown_alerted[device] = mono
        self._pending.append(
            RaiseAlert(
                code="device.unknown",
                severity="warning",
                subject={"device": device},
                message=f"messages from {device!r}, which is not configured",
            )
        )

    def _reject(self, kind: str, device: str, reason: str, detail: str, now: float, mono: float) -> None:
        self.rejected[(kind, reason)] += 1
        source = f"{kind}/{device}"[:DETAIL_MAX]
        self._pending_rejections.append((now, source, reason, detail[:DETAIL_MAX]))
        if len(self._last_logged) > MAX_TRACKED_SOURCES:  # topics are attacker-chosen: bound the memory
            self._last_logged.clear()
        last = self._last_logged.get(source)
        if last is None or mono - last >= LOG_EVERY:
            self._last_logged[source] = mono
            log.warning("input rejected", source=source, reason=reason, detail=detail[:DETAIL_MAX])

    async def _submit_pending(self) -> list[tuple[Command, asyncio.Task[bool]]]:
        """Hand queued commands to the writer without awaiting their commit, at most MAX_IN_FLIGHT at once.

        Waiting for a free place holds up this message's caller, the MQTT receive loop: a writer that falls
        behind slows the intake down instead of piling up tasks in memory. Each task says whether it committed.
        """
        submitted: list[tuple[Command, asyncio.Task[bool]]] = []
        while self._pending:
            cmd = self._pending.popleft()
            await self._in_flight.acquire()
            task = asyncio.create_task(self._submit(cmd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            submitted.append((cmd, task))
        return submitted

    async def _submit(self, cmd: Command) -> bool:
        reply = None
        try:
            # A camera read is a car waiting at a gate: the writer's priority lane.
            reply = await self._writer.submit(cmd, urgent=isinstance(cmd, Enter | Exit))
        except WriterClosed:
            return False  # shutting down: a persistent session brings the read again, the device its report
        finally:
            self._in_flight.release()
            self._settled(cmd, reply)
        if isinstance(cmd, Enter | Exit):
            self.decisions[reply.code or "ok"] += 1
        return True

    def _settled(self, cmd: Command, reply: Reply | None) -> None:
        """Tell the tracker what became of its transitions: committed, or owed again."""
        transitions = self._transitions.pop(id(cmd), None)
        if transitions is None:
            return
        if reply is not None and reply.ok:
            self.tracker.committed(transitions)
        else:
            self.tracker.failed(transitions, self._clock.monotonic())
            self._wakeup.set()

    async def run(self) -> None:
        """Commit debounced sensor transitions when due; flush the rejection log once a second."""
        try:
            await asyncio.gather(self._debounce_loop(), self._flush_loop(), self._seen_loop())
        finally:
            await self.stop()

    async def _debounce_loop(self) -> None:
        while True:
            deadlines = [d for d in (self.tracker.next_deadline(), self.tracker.next_silence()) if d is not None]
            timeout = max(0.0, min(deadlines) - self._clock.monotonic()) if deadlines else None
            self._wakeup.clear()
            if timeout is None or timeout > 0:
                await self._clock.wait(self._wakeup, timeout)
            mono = self._clock.monotonic()
            # The tracker counts on the monotonic clock; the store records when the state was first seen.
            to_wall = self._clock.wall() - mono
            transitions = self.tracker.due(mono)
            due = [
                SensorChange(sensor=t.sensor_id, state="occupied" if t.occupied else "vacant", at=t.at + to_wall)
                for t in transitions
            ]
            # After due(): a state that held before the silence is committed first.
            for sensor, seen in self.tracker.silent(mono):
                due.append(SensorChange(sensor=sensor, state="offline", at=seen + to_wall))
                self._stored.pop(sensor, None)
                self._to_store.pop(sensor, None)
            # What a pick for a car found in a slot may need to know (gateway/core/reconcile.py).
            picks = any(c.state == "occupied" for c in due)
            arriving = self.tracker.arriving() if picks else frozenset()
            for i in range(0, len(due), SENSOR_BATCH):
                cmd = SensorChanges(changes=tuple(due[i : i + SENSOR_BATCH]), arriving=arriving)
                self._transitions[id(cmd)] = transitions[i : i + SENSOR_BATCH]
                self._pending.append(cmd)
            await self._submit_pending()

    async def _seen_loop(self) -> None:
        """Every sensor_seen_flush: the offline deadlines that moved, in one command per SEEN_BATCH sensors."""
        while True:
            await self._clock.sleep(self._flush_every)
            sensors = list(self._to_store)
            for i in range(0, len(sensors), SEEN_BATCH):
                self._pending.append(self._store_deadlines(sensors[i : i + SEEN_BATCH]))
            await self._submit_pending()

    async def _flush_loop(self) -> None:
        while True:
            await self._clock.sleep(1.0)
            if self._pending_rejections:
                items, self._pending_rejections = self._pending_rejections, []
                await self._writer.submit(RecordRejections(items=tuple(items)))


def _all(tasks: list[asyncio.Task[bool]]) -> Handled:
    """None without tasks; else one future: True once every task committed, False if one did not."""
    if not tasks:
        return None
    if len(tasks) == 1:
        return tasks[0]
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    left = [len(tasks)]

    def one(task: asyncio.Task[bool]) -> None:
        if done.done():
            return
        if task.cancelled() or task.exception() is not None or not task.result():
            done.set_result(False)
            return
        left[0] -= 1
        if not left[0]:
            done.set_result(True)

    for task in tasks:
        task.add_done_callback(one)
    return done
