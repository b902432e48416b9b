"""Sensor ordering, deduplication, reboot detection and debounce, in memory.

Heartbeats arrive far more often than states change; they only touch this tracker, never the disk.
All times are the caller's clock (`now`), not the device's: device clocks drift and jump.

Ordering, per sensor:
- an observation with a `seq` (JSON `seq`, TTS `f_cnt`) is ordered by it: equal to the last accepted
  one is a DUPLICATE, lower is OUT_OF_ORDER, unless the counter was reset (below);
- otherwise one with a device `ts` is ordered by it the same way;
- otherwise arrival order decides and it is always accepted.

Counter resets (REBOOT, accepted and the counter restarts from it): a lower `seq` is a reset when it is
at most `REBOOT_LOW_SEQ` (a fresh counter's first frames; a LoRaWAN rejoin restarts `f_cnt` at 0) or
below half the last one (a reset after a short run; QoS 1 redeliveries and reordering land just
below the last seq, not half-way down). A device `ts` more than `CLOCK_RESET_S` before the last one
is a device clock reset; smaller regressions are late messages and dropped. The price of the seq rule:
a message reordered across a counter reset is taken as a reset; debounce then absorbs its state unless
nothing newer follows within `debounce`.

Debounce: a state counts once it has held for `debounce` seconds since it was first seen; a
`Transition` is due only for a state that differs from the last one committed (or seeded), or on its way.

Commit: `due` hands a transition out without taking it as committed; the caller reports the writer's answer,
`committed` or `failed`. Until then the transition is the sensor's state on its way to the store (new messages
are compared with it); a failed one is owed again after `RETRY_S`, unless the sensor has moved on since.

Silence: a sensor heard at least once and then silent for its `offline_after` is returned once by `silent()`
(call it after `due()`); its state is then unknown, so whatever it reports next is a transition again. One heap
entry per sensor, re-pushed when it comes due early: a heartbeat costs O(1), never a write.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class Report(Protocol):
    """What the tracker needs of a sensor message (the drivers' `SensorObservation` is one)."""

    @property
    def sensor_id(self) -> str: ...
    @property
    def occupied(self) -> bool: ...
    @property
    def ts(self) -> float | None: ...
    @property
    def seq(self) -> int | None: ...


REBOOT_LOW_SEQ = 3
CLOCK_RESET_S = 600.0
RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class Transition:
    """A debounced state change worth committing; `at` is when the state was first seen."""

    sensor_id: str
    occupied: bool
    at: float


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    REBOOT = "reboot"


@dataclass(slots=True)
class _Sensor:
    last_seq: int | None = None
    last_ts: float | None = None
    last_seen: float | None = None
    emitted: bool | None = None  # committed to the store
    inflight: Transition | None = None  # handed out by due(), its commit not yet reported
    pending: bool | None = None
    pending_since: float = 0.0
    generation: int = 0  # bumps whenever the pending state changes; stale heap entries are skipped
    watched: bool = False  # has an entry in the silence heap
    silent: bool = False  # went silent (or offline in the store) and was not heard since


class SensorTracker:
    """Per-sensor ordering and debounce; `observe` on each message, `due` when `next_deadline` passes."""

    def __init__(
        self,
        *,
        debounce: float,
        offline_after: float | None = None,
        offline_overrides: Mapping[str, float] | None = None,
    ) -> None:
        if debounce < 0:
            raise ValueError("debounce must be >= 0")
        self._debounce = debounce
        self._offline_after = offline_after
        self._offline_overrides = dict(offline_overrides or {})
        self._silence: list[tuple[float, str]] = []
        self._sensors: dict[str, _Sensor] = {}
        self._deadlines: list[tuple[float, str, int]] = []
        # States that held for `debounce` and were then replaced before due() ran (a busy loop): still owed.
        self._ready: list[tuple[float, Transition]] = []
        self._arriving: set[str] = set()  # sensors debouncing an occupancy

    def seed(self, sensor_id: str, occupied: bool | None) -> None:
        """Set the committed state from the store, so only real changes are emitted."""
        if occupied is None and sensor_id not in self._sensors:
            return  # the same as a sensor never seen: no entry until it reports (10,000s of them at a start)
        sensor = self._sensors.setdefault(sensor_id, _Sensor())
        sensor.emitted = occupied
        if sensor.pending is not None and sensor.pending == occupied:
            self._clear_pending(sensor_id, sensor)

    def last_seen(self, sensor_id: str) -> float | None:
        """When the last accepted message of this sensor arrived, heartbeats included."""
        sensor = self._sensors.get(sensor_id)
        return None if sensor is None else sensor.last_seen

    def observe(self, obs: Report, now: float) -> Verdict:
        sensor = self._sensors.setdefault(obs.sensor_id, _Sensor())
        verdict = self._order(sensor, obs)
        if verdict in (Verdict.DUPLICATE, Verdict.OUT_OF_ORDER):
            return verdict
        sensor.last_seen = now
        after = self.offline_after(obs.sensor_id)
        if after is not None and (sensor.silent or not sensor.watched):
            heapq.heappush(self._silence, (now + after, obs.sensor_id))
            sensor.watched = True
        sensor.silent = False
        if obs.seq is not None:
            sensor.last_seq = obs.seq
        if obs.ts is not None:
            sensor.last_ts = obs.ts
        elif verdict is Verdict.REBOOT:
            sensor.last_ts = None  # the old device clock means nothing after a reset
        if obs.occupied == sensor.pending:
            return verdict  # a heartbeat of the state already being debounced
        if sensor.pending is not None and sensor.pending_since + self._debounce <= now:
            # The pending state has held long enough; that due() has not run yet must not turn it into a flap.
            self._promote(obs.sensor_id, sensor)
        if obs.occupied == _target(sensor):
            self._clear_pending(obs.sensor_id, sensor)  # back to the committed state (or the one on its way): a flap
            return verdict
        sensor.pending = obs.occupied
        sensor.pending_since = now
        sensor.generation += 1
        if obs.occupied:
            self._arriving.add(obs.sensor_id)
        else:
            self._arriving.discard(obs.sensor_id)
        heapq.heappush(self._deadlines, (now + self._debounce, obs.sensor_id, sensor.generation))
        return verdict

    def _promote(self, sensor_id: str, sensor: _Sensor) -> None:
        assert sensor.pending is not None
        transition = Transition(sensor_id, sensor.pending, sensor.pending_since)
        self._ready.append((sensor.pending_since + self._debounce, transition))
        sensor.inflight = transition
        self._clear_pending(sensor_id, sensor)

    def due(self, now: float) -> list[Transition]:
        """Pending states that have held for `debounce`, oldest deadline first; report each one's commit."""
        transitions = [t for deadline, t in self._ready if deadline <= now]
        self._ready = [(deadline, t) for deadline, t in self._ready if deadline > now]
        while self._deadlines and self._deadlines[0][0] <= now:
            _, sensor_id, generation = heapq.heappop(self._deadlines)
            sensor = self._sensors[sensor_id]
            if generation != sensor.generation or sensor.pending is None:
                continue
            transition = Transition(sensor_id, sensor.pending, sensor.pending_since)
            transitions.append(transition)
            sensor.inflight = transition
            self._clear_pending(sensor_id, sensor)
        return transitions

    def committed(self, transitions: list[Transition]) -> None:
        """The writer committed these (handed out by `due`)."""
        for t in transitions:
            sensor = self._sensors[t.sensor_id]
            if not sensor.silent:  # gone silent since: its state stays unknown
                sensor.emitted = t.occupied
            if sensor.inflight is t:
                sensor.inflight = None

    def failed(self, transitions: list[Transition], now: float) -> None:
        """The writer could not commit these: owed again after RETRY_S, unless the sensor has moved on."""
        for t in transitions:
            sensor = self._sensors[t.sensor_id]
            if sensor.inflight is not t:
                continue  # a newer transition of this sensor is on its way and supersedes this one
            sensor.inflight = None
            if sensor.pending is None:
                if t.occupied != sensor.emitted:
                    sensor.inflight = t
                    self._ready.append((now + RETRY_S, t))
            elif sensor.pending == sensor.emitted:
                self._clear_pending(t.sensor_id, sensor)  # changed back while on its way: the store already has it
            # else: the newer pending state differs from the store and comes due by itself

    def arriving(self) -> frozenset[str]:
        """Sensors whose occupancy is still being debounced (a car that has just parked, or a flap): not yet in
        the store, but a car there is not on its way to anywhere else."""
        return frozenset(self._arriving)

    def offline_after(self, sensor_id: str) -> float | None:
        return self._offline_overrides.get(sensor_id, self._offline_after)

    def silent(self, now: float) -> list[tuple[str, float]]:
        """Sensors silent for their offline_after since they were last heard, each once: (sensor, last_seen)."""
        out: list[tuple[str, float]] = []
        while self._silence and self._silence[0][0] <= now:
            _, sensor_id = heapq.heappop(self._silence)
            sensor = self._sensors[sensor_id]
            after = self.offline_after(sensor_id)
            if sensor.silent or sensor.last_seen is None or after is None:
                continue
            due = sensor.last_seen + after
            if due > now:
                heapq.heappush(self._silence, (due, sensor_id))
                continue
            sensor.watched = False
            self.mark_offline(sensor_id)
            out.append((sensor_id, sensor.last_seen))
        return out

    def next_silence(self) -> float | None:
        """When `silent()` may next have something (possibly early: entries move only when they come due)."""
        return self._silence[0][0] if self._silence else None

    def is_silent(self, sensor_id: str) -> bool:
        sensor = self._sensors.get(sensor_id)
        return sensor is not None and sensor.silent

    def mark_offline(self, sensor_id: str) -> None:
        """The sensor's state is unknown (silent, or offline in the store): its next report is a transition."""
        sensor = self._sensors.setdefault(sensor_id, _Sensor())
        sensor.silent = True
        sensor.emitted = None  # a state still pending is owed as it is
        sensor.inflight = None

    def next_deadline(self) -> float | None:
        ready = min((deadline for deadline, _ in self._ready), default=None)
        while self._deadlines:
            deadline, sensor_id, generation = self._deadlines[0]
            sensor = self._sensors[sensor_id]
            if generation == sensor.generation and sensor.pending is not None:
                return deadline if ready is None else min(ready, deadline)
            heapq.heappop(self._deadlines)
        return ready

    def _order(self, sensor: _Sensor, obs: Report) -> Verdict:
        if obs.seq is not None and sensor.last_seq is not None:
            last = sensor.last_seq
            if obs.seq == last:
                return Verdict.DUPLICATE
            if obs.seq > last:
                return Verdict.ACCEPTED
            if obs.seq <= REBOOT_LOW_SEQ or obs.seq < last // 2:
                return Verdict.REBOOT
            return Verdict.OUT_OF_ORDER
        if obs.seq is None and obs.ts is not None and sensor.last_ts is not None:
            if obs.ts == sensor.last_ts:
                return Verdict.DUPLICATE
            if obs.ts > sensor.last_ts:
                return Verdict.ACCEPTED
            if sensor.last_ts - obs.ts > CLOCK_RESET_S:
                return Verdict.REBOOT
            return Verdict.OUT_OF_ORDER
        return Verdict.ACCEPTED

    def _clear_pending(self, sensor_id: str, sensor: _Sensor) -> None:
        sensor.pending = None
        sensor.generation += 1
        self._arriving.discard(sensor_id)


def _target(sensor: _Sensor) -> bool | None:
    """The state the store has, or will have once the transition on its way commits."""
    return sensor.emitted if sensor.inflight is None else sensor.inflight.occupied
