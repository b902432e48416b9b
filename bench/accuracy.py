"""Availability accuracy: a simulated day of a 500-slot lot against the simulator's ground truth.

Run: `.venv/bin/python -m bench.accuracy` (a whole day; see bench/README.md, section Accuracy), `--hours 1` for a
smoke check, `--seeds 1-6` for six days (two at a time) and a table of them.

The gateway runs in this process on a ManualClock, with its real services, a real store on disk and a real
Mosquitto subprocess; the simulator speaks the wire (JSON sensors, TTS uplinks, camera reads) and reads what the
gateway publishes (R/lots/<lot>/availability, R/slots/<slot>, R/events) through its own MQTT client. The bench
drives the clock: each step (0.5 s of simulated time) it publishes what happens in that step, waits until the
gateway has taken every message, committed everything it owes and published the result (and the subscriber has
received it), then moves the clock on. So the gateway's timers (debounce, coalescing, vacate grace, offline) run
on simulated time exactly, and real processing time (milliseconds here) counts as zero: the measure is of the
gateway's decisions, not of its CPU (bench/ingest.py measures that).

Ground truth is what a perfect observer would publish under the contract's rules: a slot is taken while a car
stands in it or while a car that entered holds it (its assigned slot until it parks, then the slot it parked in,
until it has left through the exit; contract §6: sessions are the truth).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import heapq
import json
import math
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from bench.ingest import NODELAY, Mosquitto, wait_for_port
from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.core.clock import ManualClock

R = "parking/gw1"
ZONES = 5
TTS_APP = "parking@ttn"
JSON_HEARTBEAT_S = 60.0
TTS_HEARTBEAT_S = 600.0
TTS_OFFLINE_AFTER_S = 3600.0


@dataclass(frozen=True)
class Options:
    hours: float = 24.0
    slots: int = 500
    step: float = 0.5
    seed: int = 1
    mispark: float = 0.10
    flapping: float = 0.02
    offline: float = 0.01
    duplicate: float = 0.02
    reorder: float = 0.02
    visits: int = 2000  # arrivals per simulated day
    json_path: str | None = None
    debug: bool = False
    dump_after: float = 400.0  # --debug: dump the slots behind the first mismatch older than this
    drive_time: float = 120.0  # the gateway's [timing] drive_time: this world's longest drive to a slot


def site_config(state_dir: Path, port: int, slots: int, drive_time: float = 120.0) -> GatewayConfig:
    per_zone = slots // ZONES
    zones = []
    for z in range(1, ZONES + 1):
        group = f'{{ ids = "Z{z}-001..Z{z}-{per_zone:03d}"'
        # The last zone's sensors are LoRaWAN (The Things Stack), with a rarer heartbeat.
        group += f", offline_after = {TTS_OFFLINE_AFTER_S:g} }}" if z == ZONES else " }"
        zones.append(f'  [[lots.zones]]\n  id = "Z{z}"\n  slots = [{group}]\n')
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{state_dir}"
[broker]
embedded = false
port = {port}
[privacy]
publish_plates = true
[timing]
drive_time = {drive_time:g}
[[lots]]
id = "lot1"
{"".join(zones)}
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
camera = "cam-in1"
[[gates]]
id = "out1"
lot = "lot1"
direction = "exit"
camera = "cam-out1"
"""
    )


@dataclass
class Convergence:
    """From each step a true value changes to the first step where the published one equals it again."""

    pending: list[float] = field(default_factory=list)  # when each change not yet converged came
    times: list[float] = field(default_factory=list)
    slow: list[tuple[float, float]] = field(default_factory=list)  # (changed at, converged after) over 7 s
    last: tuple[int, ...] | None = None

    def observe(self, now: float, truth: tuple[int, ...], seen: tuple[int, ...] | None) -> None:
        if truth != self.last:
            self.pending.append(now)
            self.last = truth
        if seen == truth:
            for t in self.pending:
                self.times.append(now - t)
                if now - t > 7:
                    self.slow.append((t, now - t))
            self.pending.clear()


@dataclass
class Car:
    plate: str
    dwell: float
    # Its own random stream (drive time, mispark, where): the gateway's decisions change which slots cars get,
    # and with one stream for the world every later draw would shift, so two gateways could not be compared.
    rng: random.Random
    assigned: str | None = None
    entered: float | None = None  # when its session started (bench time)
    slot: str | None = None  # where it stands or last stood


@dataclass
class Sensor:
    slot: str
    tts: bool
    rng: random.Random  # its glitches and its messages' fate (duplicated, late), as Car.rng
    seq: int = 0
    dead: bool = False
    flapping: bool = False


@dataclass
class Observed:
    """What the bench's subscriber has received."""

    availability: dict[str, Any] | None = None
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: int = 0
    started: list[dict[str, Any]] = field(default_factory=list)
    denied: list[dict[str, Any]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


def demand(t: float) -> float:
    """Relative arrival rate over the day: quiet at night, a morning peak, a busy day, an evening bump."""
    h = (t / 3600.0) % 24
    return (
        0.15
        + 1.6 * math.exp(-(((h - 8.5) / 1.5) ** 2))
        + 0.9 * math.exp(-(((h - 13) / 3) ** 2))
        + (0.7 * math.exp(-(((h - 18.5) / 1.5) ** 2)))
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Day:
    def __init__(self, opts: Options, gw: Gateway, client: aiomqtt.Client, clock: ManualClock) -> None:
        self.opts = opts
        self.gw = gw
        self.client = client
        self.clock = clock
        self.rng = random.Random(opts.seed)
        per_zone = opts.slots // ZONES
        self.slot_ids = [f"Z{z}-{i:03d}" for z in range(1, ZONES + 1) for i in range(1, per_zone + 1)]
        self.zone_of = {s: s.split("-")[0] for s in self.slot_ids}
        self.sensors = {
            s: Sensor(s, self.zone_of[s] == f"Z{ZONES}", random.Random(f"{opts.seed}/sensor/{s}"))
            for s in self.slot_ids
        }
        self.physical: dict[str, Car | None] = dict.fromkeys(self.slot_ids)
        self.owner: dict[str, Car | None] = dict.fromkeys(self.slot_ids)
        self.cars: dict[str, Car] = {}
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.order = 0
        self.outbox: list[tuple[str, bytes]] = []
        self.sent = 0
        self.reads = 0
        self.now = 0.0
        self.observed = Observed()
        self.counts: Counter[str] = Counter()
        # results
        self.samples = 0
        self.exact = 0
        self.exact_lot = 0
        self.slot_samples = 0
        self.slot_exact = 0
        self.conv = Convergence()
        self.lot_conv = Convergence()  # the lot's two counts alone (a car counted in the wrong zone is right here)
        self.debug = opts.debug
        self.diag: Counter[str] = Counter()
        self.diag_zones: Counter[str] = Counter()  # only the wrong slots that put their zone's count off
        self.trace: list[dict[str, Any]] = []
        self.plate_of: dict[str, str] = {}
        self.dumped = False

    # --- the simulated world -----------------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        self.order += 1
        heapq.heappush(self.queue, (t, self.order, action))

    def setup(self) -> None:
        rng = self.rng
        for sensor in self.sensors.values():
            every = TTS_HEARTBEAT_S if sensor.tts else JSON_HEARTBEAT_S
            self.at(rng.uniform(0, every), functools.partial(self._heartbeat, sensor, every))
        chosen = rng.sample(self.slot_ids, round(len(self.slot_ids) * (self.opts.flapping + self.opts.offline)))
        n_flap = round(len(self.slot_ids) * self.opts.flapping)
        for slot in chosen[:n_flap]:
            self.sensors[slot].flapping = True
            self.at(self.sensors[slot].rng.expovariate(1 / 300), functools.partial(self._glitch, self.sensors[slot]))
        for slot in chosen[n_flap:]:
            self.at(rng.uniform(3600, 20 * 3600), functools.partial(self._die, self.sensors[slot]))
        self.at(self._next_arrival(0.0), self._arrive)

    def _next_arrival(self, t: float) -> float:
        # Thinning of a Poisson process whose rate follows demand(); the mean rate gives `visits` a day.
        profile = [demand(m * 60.0) for m in range(1440)]
        most = max(profile)
        peak = self.opts.visits / 86400.0 / statistics.fmean(profile) * most
        while True:
            t += self.rng.expovariate(peak)
            if self.rng.random() < demand(t) / most:
                return t

    def _report(self, sensor: Sensor, occupied: bool) -> None:
        """One sensor message on the wire; sometimes twice, sometimes late (overtaken by the next)."""
        if sensor.dead:
            return
        sensor.seq += 1
        if sensor.tts:
            body: dict[str, Any] = {
                "end_device_ids": {"device_id": sensor.slot},
                "uplink_message": {"f_cnt": sensor.seq, "decoded_payload": {"occupied": occupied, "battery": 3.6}},
            }
            topic = f"v3/{TTS_APP}/devices/{sensor.slot}/up"
        else:
            body = {"occupied": occupied, "seq": sensor.seq, "battery": 3.6}
            topic = f"sensors/{sensor.slot}/state"
        payload = json.dumps(body).encode()
        roll = sensor.rng.random()
        if roll < self.opts.reorder:
            self.counts["reordered"] += 1
            self.at(self.now + sensor.rng.uniform(1.0, 3.0), lambda: self.outbox.append((topic, payload)))
            return
        self.outbox.append((topic, payload))
        if roll < self.opts.reorder + self.opts.duplicate:
            self.counts["duplicated"] += 1
            self.at(self.now + sensor.rng.uniform(0.0, 1.0), lambda: self.outbox.append((topic, payload)))

    def _heartbeat(self, sensor: Sensor, every: float) -> None:
        self._report(sensor, self.physical[sensor.slot] is not None)
        self.at(self.now + every, lambda: self._heartbeat(sensor, every))

    def _glitch(self, sensor: Sensor) -> None:
        """A flapping sensor: a wrong reading, shorter than the debounce, then the right one again."""
        self.counts["glitches"] += 1
        self._report(sensor, self.physical[sensor.slot] is None)
        self.at(
            self.now + sensor.rng.uniform(0.3, 3.0),
            lambda: self._report(sensor, self.physical[sensor.slot] is not None),
        )
        self.at(self.now + sensor.rng.expovariate(1 / 300), lambda: self._glitch(sensor))

    def _die(self, sensor: Sensor) -> None:
        self.counts["sensors_died"] += 1
        sensor.dead = True

    def _arrive(self) -> None:
        self.reads += 1
        self.counts["arrivals"] += 1
        n = self.counts["arrivals"]
        car = Car(
            f"C{n:05d}",
            dwell=min(10 * 3600.0, max(600.0, self.rng.lognormvariate(math.log(5400), 0.7))),
            rng=random.Random(f"{self.opts.seed}/car/{n}"),
        )
        self.cars[car.plate] = car
        self.outbox.append(
            ("cameras/cam-in1/reads", json.dumps({"event_id": f"in{self.reads}", "plate": car.plate}).encode())
        )
        self.at(self._next_arrival(self.now), self._arrive)

    def _entered(self, plate: str, slot: str) -> None:
        """The gateway assigned a slot (session.started): the car holds it and drives there."""
        car = self.cars[plate]
        if self.physical[slot] is not None:
            self.counts["assigned_taken"] += 1  # a car stood there already (its report not yet in, or too late)
        car.assigned = slot
        car.entered = self.now
        self.owner[slot] = car
        self.at(self.now + car.rng.uniform(20, 120), lambda: self._park(car))

    def _free_slots(self) -> list[str]:
        return [s for s in self.slot_ids if self.physical[s] is None and self.owner[s] is None]

    def _park(self, car: Car) -> None:
        assert car.assigned is not None
        target = car.assigned
        if car.rng.random() < self.opts.mispark or self.physical[target] is not None:
            free = self._free_slots()
            same = [s for s in free if self.zone_of[s] == self.zone_of[target]]
            pool = same if same and car.rng.random() < 0.7 else free
            if pool:
                target = car.rng.choice(pool)
                self.counts["misparked"] += 1
            elif self.physical[target] is not None:
                target = next((s for s in self.slot_ids if self.physical[s] is None), target)
        if self.physical[target] is not None:
            self.counts["gave_up"] += 1
            self.owner[car.assigned] = None if self.owner[car.assigned] is car else self.owner[car.assigned]
            self.at(self.now + 30, lambda: self._exit(car))
            return
        if self.owner[car.assigned] is car:
            self.owner[car.assigned] = None
        self.owner[target] = car
        self.physical[target] = car
        car.slot = target
        self._report(self.sensors[target], True)
        self.at(self.now + car.dwell, lambda: self._leave(car))

    def _leave(self, car: Car) -> None:
        assert car.slot is not None
        self.physical[car.slot] = None
        self._report(self.sensors[car.slot], False)
        self.at(self.now + car.rng.uniform(20, 90), lambda: self._exit(car))

    def _exit(self, car: Car) -> None:
        self.reads += 1
        self.outbox.append(
            ("cameras/cam-out1/reads", json.dumps({"event_id": f"out{self.reads}", "plate": car.plate}).encode())
        )
        for slot in (car.slot, car.assigned):
            if slot is not None and self.owner[slot] is car:
                self.owner[slot] = None

    def truth(self) -> tuple[int, ...]:
        """(lot available, lot occupied, then available and occupied per zone)."""
        taken = Counter(
            self.zone_of[s] for s in self.slot_ids if self.physical[s] is not None or self.owner[s] is not None
        )
        per_zone = len(self.slot_ids) // ZONES
        out = [len(self.slot_ids) - sum(taken.values()), sum(taken.values())]
        for z in range(1, ZONES + 1):
            out += [per_zone - taken[f"Z{z}"], taken[f"Z{z}"]]
        return tuple(out)

    def published(self) -> tuple[int, ...] | None:
        doc = self.observed.availability
        if doc is None:
            return None
        out = [doc["available"], doc["occupied"]]
        for z in range(1, ZONES + 1):
            zone = doc["zones"][f"Z{z}"]
            out += [zone["available"], zone["occupied"]]
        return tuple(out)

    # --- the wire and the gateway ------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        obs = self.observed
        if topic == f"{R}/lots/lot1/availability":
            obs.availability = json.loads(payload)
            obs.ready.set()
        elif topic.startswith(f"{R}/slots/"):
            obs.slots[topic.rsplit("/", 1)[1]] = json.loads(payload)
        elif topic == f"{R}/events":
            obs.events += 1
            event = json.loads(payload)
            obs.kinds[event["type"] if event["type"] != "alert" else f"alert {event['code']}"] += 1
            if self.debug and event["type"] in ("session.moved", "session.started"):
                self.trace.append(event)
            if self.debug and event["type"] == "alert":
                car = self.physical.get(event["subject"].get("slot", ""))
                print(
                    f"  t={self.now:.1f} alert {event['code']} {event['subject']} {event['message']}"
                    f" car {car and (car.plate, car.assigned, car.entered)}",
                    file=sys.stderr,
                )
            if event["type"] == "session.started":
                obs.started.append(event)
            elif event["type"] == "entry.denied":
                obs.denied.append(event)

    def handled(self) -> int:
        ing = self.gw.ingress
        return sum(ing.verdicts.values()) + ing.accepted["camera"] + sum(ing.rejected.values())

    def idle(self) -> bool:
        gw = self.gw
        due = gw.writer.next_due[0]
        return not (
            gw.ingress._tasks
            or gw.ingress._pending
            or gw.writer.queue_depth
            or (due is not None and due <= gw.writer.timeline.now())
            or self.observed.events < gw.publisher.events_published
            or self.observed.availability != gw.publisher.availability_docs.get("lot1")
        )

    async def sync(self) -> None:
        """Until the gateway has taken every message, committed what it owes and its publications arrived."""
        deadline = time.monotonic() + 30
        while self.handled() < self.sent:
            await asyncio.sleep(0.0002)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway took {self.handled()} of {self.sent} messages")
        stable = 0
        while stable < 3:
            for _ in range(3):
                await asyncio.sleep(0)
            if self.idle():
                stable += 1
            else:
                stable = 0
                await asyncio.sleep(0.0005)
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway did not settle")

    async def flush(self) -> None:
        out, self.outbox = self.outbox, []
        if out:
            self.sent += len(out)
            await asyncio.gather(*(self.client.publish(t, p, qos=1) for t, p in out))

    async def run(self) -> None:
        self.setup()
        end = self.opts.hours * 3600.0
        step = self.opts.step
        started = time.monotonic()
        next_progress = 3600.0
        while self.now < end:
            self.now += step
            self.clock.advance(step)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, action = heapq.heappop(self.queue)
                action()
            await self.flush()
            await self.sync()
            # Entries decided in this step: the assigned slots are held from now; their cars drive off.
            while self.observed.started:
                event = self.observed.started.pop(0)
                self._entered(event["vehicle"], event["slot"])
            while self.observed.denied:
                self.observed.denied.pop(0)
                self.counts["denied"] += 1
            if self.debug:
                self.judge_moves()
            self.measure()
            if self.now >= next_progress:
                print(
                    f"  {self.now / 3600:5.1f} h simulated, {time.monotonic() - started:6.0f} s real,"
                    f" exact {self.exact / max(1, self.samples):.4%}",
                    file=sys.stderr,
                    flush=True,
                )
                next_progress += 3600.0

    def measure(self) -> None:
        truth = self.truth()
        seen = self.published()
        self.conv.observe(self.now, truth, seen)
        self.lot_conv.observe(self.now, truth[:2], None if seen is None else seen[:2])
        if (
            self.debug
            and self.conv.pending
            and self.now - self.conv.pending[0] > self.opts.dump_after
            and not self.dumped
        ):
            self.dumped = True
            print(f"t={self.now:.1f} truth={truth} published={seen}", file=sys.stderr)
            for slot in self.slot_ids:
                doc = self.observed.slots.get(slot, {})
                taken = self.physical[slot] is not None or self.owner[slot] is not None
                if (doc.get("status") == "occupied") != taken:
                    phys, own = self.physical[slot], self.owner[slot]
                    conn = sqlite3.connect(f"file:{self.gw.db}?mode=ro", uri=True)
                    print(
                        "   store:",
                        conn.execute("SELECT * FROM slots WHERE id = ?", (slot,)).fetchall(),
                        file=sys.stderr,
                    )
                    for row in conn.execute(
                        "SELECT * FROM sessions WHERE slot = ? OR id = ?", (slot, doc.get("session"))
                    ):
                        print("   session:", row, file=sys.stderr)
                        print(
                            "   deadline:",
                            conn.execute("SELECT * FROM deadlines WHERE subject = ?", (row[0],)).fetchall(),
                            file=sys.stderr,
                        )
                    conn.close()
                    print(
                        f"  {slot}: published {doc}, physical {phys and phys.plate}, owner {own and own.plate}"
                        f" (assigned {own and own.assigned}), sensor dead={self.sensors[slot].dead}",
                        file=sys.stderr,
                    )
        if self.now % 1.0 == 0:
            self.samples += 1
            self.exact += seen == truth
            self.exact_lot += seen is not None and seen[:2] == truth[:2]
        if self.now % 10.0 == 0:
            wrong = []
            for slot in self.slot_ids:
                state = self.observed.slots.get(slot)
                taken = self.physical[slot] is not None or self.owner[slot] is not None
                self.slot_samples += 1
                ok = state is not None and (state["status"] == "occupied") == taken
                self.slot_exact += ok
                if not ok:
                    wrong.append(slot)
            if self.debug and wrong:
                self.diagnose(wrong, seen, truth)

    def judge_moves(self) -> None:
        """Was each re-seat right (the session's car is in the slot it went to)? Printed and counted (--debug)."""
        for event in self.trace:
            if event["type"] == "session.started":
                self.plate_of[event["session_id"]] = event["vehicle"]
                continue
            car = self.cars.get(self.plate_of.get(event["session_id"], ""))
            to = event["to_slot"]
            if car is None:
                verdict = "unknown"
            elif to is None:
                verdict = "none"
            elif self.physical[to] is car:
                verdict = "right"
            elif car.assigned == to and car.slot is None:
                verdict = "right (driving there)"
            else:
                where = car.slot if car.slot and self.physical[car.slot] is car else f"driving to {car.assigned}"
                verdict = f"wrong (car at {where})"
            self.diag[f"move {event['reason']} {verdict.split(' (car')[0]}"] += 1
            print(
                f"  t={self.now:.1f} {event['reason']} {car and car.plate} {event['from_slot']} -> {to}: {verdict}",
                file=sys.stderr,
            )
        self.trace.clear()

    def whereabouts(self, car: Car) -> str:
        if car.slot is not None and self.physical[car.slot] is car:
            return "parked"
        if car.assigned is not None and self.owner[car.assigned] is car:
            return "driving"
        return "gone"

    def diagnose(self, wrong: list[str], seen: tuple[int, ...] | None, truth: tuple[int, ...]) -> None:
        """Count wrong slot samples by what lies behind them (--debug); in `diag_zones` only those that move a
        published count: a slot published taken in a zone counted too full, or free in one counted too empty (a
        wrong slot in a zone whose count is right has a partner there, the same car counted in another slot)."""
        off = {
            f"Z{z}": 0 if seen is None else seen[3 + 2 * (z - 1)] - truth[3 + 2 * (z - 1)] for z in range(1, ZONES + 1)
        }
        conn = sqlite3.connect(f"file:{self.gw.db}?mode=ro", uri=True)
        try:
            for slot in wrong:
                doc = self.observed.slots.get(slot, {})
                phys, own = self.physical[slot], self.owner[slot]
                sess = doc.get("session")
                plate = None
                if sess is not None:
                    row = conn.execute("SELECT plate, seated_at FROM sessions WHERE id = ?", (sess,)).fetchone()
                    plate = row[0] if row else None
                    seated = "seated" if row and row[1] is not None else "unseated"
                sensor = self.sensors[slot]
                if doc.get("status") == "occupied":
                    if sess is None:
                        kind = f"pub-occ/no-session sensor={doc.get('sensor')}"
                    else:
                        car = self.cars.get(plate or "")
                        where = "?" if car is None else self.whereabouts(car)
                        mine = "own" if car is not None and car.assigned == slot else "other"
                        kind = f"pub-occ/session-car-{where} sensor={doc.get('sensor')} {seated} {mine}"
                else:
                    car = phys or own
                    row = None
                    if car is not None:
                        row = conn.execute(
                            "SELECT slot, seated_at FROM sessions WHERE plate = ? AND state = 'active'", (car.plate,)
                        ).fetchone()
                    sess_at = "none" if row is None else ("null-slot" if row[0] is None else "elsewhere")
                    kind = (
                        f"pub-free/{'parked' if phys else 'driving'} session={sess_at}"
                        f" sensor={doc.get('sensor')} dead={sensor.dead}"
                    )
                self.diag[kind] += 1
                zone_off = off[self.zone_of[slot]]
                if (zone_off > 0 and doc.get("status") == "occupied") or (
                    zone_off < 0 and doc.get("status") != "occupied"
                ):
                    self.diag_zones[kind] += 1
        finally:
            conn.close()


async def simulate(opts: Options, root: Path) -> dict[str, Any]:
    broker = Mosquitto(root)
    try:
        await wait_for_port(broker.port)
        cfg = site_config(root / "state", broker.port, opts.slots, opts.drive_time)
        clock = ManualClock()
        gw = Gateway(cfg, clock=clock)
        task = asyncio.create_task(gw.run())
        await gw.wait_ready()
        client = aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-sim", socket_options=(NODELAY,))
        client.pending_calls_threshold = 100_000
        async with client:
            await client.subscribe(f"{R}/#", qos=1)
            day = Day(opts, gw, client, clock)

            async def pump() -> None:
                async for m in client.messages:
                    payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                    day.on_message(m.topic.value, payload)

            pumping = asyncio.create_task(pump())
            await asyncio.wait_for(day.observed.ready.wait(), 30)
            wall_start = time.monotonic()
            try:
                await day.run()
            finally:
                real = time.monotonic() - wall_start
                pumping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pumping
        gw.stop()
        await asyncio.wait_for(task, 30)
    finally:
        broker.stop()
    conv = day.conv.times
    return {
        "simulated_h": opts.hours,
        "real_s": round(real, 1),
        "samples": day.samples,
        "exact": day.exact / max(1, day.samples),
        "exact_lot_counts": day.exact_lot / max(1, day.samples),
        "slot_status_exact": day.slot_exact / max(1, day.slot_samples),
        "changes": len(conv),
        "unconverged_at_end": len(day.conv.pending),
        "converge_p50_s": percentile(conv, 0.50),
        "converge_p99_s": percentile(conv, 0.99),
        "converge_max_s": max(conv, default=float("nan")),
        "over_7s": len(day.conv.slow),
        "lot_changes": len(day.lot_conv.times),
        "lot_converge_p50_s": percentile(day.lot_conv.times, 0.50),
        "lot_converge_p99_s": percentile(day.lot_conv.times, 0.99),
        "lot_over_7s": len(day.lot_conv.slow),
        "messages_sent": day.sent,
        "world": dict(day.counts),
        "gateway_events": dict(day.observed.kinds),
        "verdicts": dict(gw.ingress.verdicts),
        "slowest": sorted(day.conv.slow, key=lambda x: -x[1])[:10],
        "diagnosis": dict(day.diag.most_common()),
        "diagnosis_zones": dict(day.diag_zones.most_common()),
        **({"over_7s_at": day.conv.slow} if day.debug else {}),  # (changed at, converged after) for each
    }


def seed_list(spec: str) -> list[int]:
    """Seeds from "1-6", "1,3,5" or both ("1-3,7")."""
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def several(args: argparse.Namespace, argv: list[str]) -> None:
    """One process per seed, `--jobs` at a time (each day is single-threaded), then one line per seed."""
    passed: list[str] = []
    skip = False
    for arg in argv:  # the same options for each run, less the ones that choose the runs and where results go
        if skip:
            skip = False
        elif arg in ("--seeds", "--jobs", "--json", "--seed"):
            skip = True
        elif not arg.startswith(("--seeds=", "--jobs=", "--json=", "--seed=")):
            passed.append(arg)
    seeds = seed_list(args.seeds)
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pg-accuracy-seeds-") as tmp:
        waiting = list(seeds)
        running: dict[int, subprocess.Popen[bytes]] = {}
        try:
            while waiting or running:
                while waiting and len(running) < max(1, args.jobs):
                    seed = waiting.pop(0)
                    out = Path(tmp) / f"{seed}.json"
                    cmd = [sys.executable, "-m", "bench.accuracy", *passed, "--seed", str(seed), "--json", str(out)]
                    running[seed] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
                time.sleep(0.2)
                for seed, proc in list(running.items()):
                    if proc.poll() is not None:
                        del running[seed]
                        if proc.returncode != 0:
                            raise SystemExit(f"seed {seed}: exit {proc.returncode}")
                        results[seed] = json.loads((Path(tmp) / f"{seed}.json").read_text())
                        print(f"  seed {seed} done", file=sys.stderr, flush=True)
        finally:  # a failed seed, ^C or SIGTERM: the other days stop too, each taking its own broker down
            for proc in running.values():
                proc.terminate()
            for proc in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print(
        "| seed | samples exact | lot counts exact | convergence p50 / p99 | max | changes over 7 s"
        " | lot counts: p50 / p99, over 7 s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seed in seeds:
        r = results[seed]
        print(
            f"| {seed} | {r['exact']:.2%} | {r['exact_lot_counts']:.2%} | {r['converge_p50_s']:g} / "
            f"{r['converge_p99_s']:g} s | {r['converge_max_s']:g} s | {r['over_7s']} of {r['changes']} |"
            f" {r['lot_converge_p50_s']:g} / {r['lot_converge_p99_s']:g} s, {r['lot_over_7s']} of {r['lot_changes']} |"
        )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--slots", type=int, default=500)
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--seeds",
        help="several days, e.g. 1-6 or 1,3: each seed's run in its own process (--jobs at a time), then a table of"
        " them (the JSON holds each run's result)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="with --seeds: runs at a time")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print every re-seat (right or wrong), alerts, the slots behind the first long mismatch, and count the"
        " wrong slot samples by cause (in the JSON's diagnosis; diagnosis_zones: those that put a zone's count off)",
    )
    parser.add_argument("--dump-after", type=float, default=400.0, help="with --debug: what a long mismatch is (s)")
    parser.add_argument(
        "--drive-time",
        type=float,
        default=120.0,
        help="the gateway's [timing] drive_time (s); this world's cars take 20-120 s from the gate to a slot",
    )
    parser.add_argument("--mispark", type=float, default=0.10)
    parser.add_argument("--flapping", type=float, default=0.02)
    parser.add_argument("--offline", type=float, default=0.01)
    parser.add_argument("--duplicate", type=float, default=0.02)
    parser.add_argument("--reorder", type=float, default=0.02)
    args = parser.parse_args(argv)
    # SIGTERM as ^C, so the finally blocks that stop the broker run (a background job's SIGINT may be ignored).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.seeds:
        several(args, sys.argv[1:] if argv is None else argv)
        return
    opts = Options(
        hours=args.hours,
        slots=args.slots,
        step=args.step,
        seed=args.seed,
        mispark=args.mispark,
        flapping=args.flapping,
        offline=args.offline,
        duplicate=args.duplicate,
        reorder=args.reorder,
        json_path=args.json_path,
        debug=args.debug,
        dump_after=args.dump_after,
        drive_time=args.drive_time,
    )
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pg-accuracy-") as tmp:
        result = asyncio.run(simulate(opts, Path(tmp)))
    result["loadavg_before"] = load_before
    result["loadavg_after"] = os.getloadavg()
    result["python"] = platform.python_version()
    print(json.dumps(result, indent=2))
    if opts.json_path:
        Path(opts.json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
