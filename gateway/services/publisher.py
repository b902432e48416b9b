"""Published state (contract §3.2): live events, retained slot states, coalesced availability, health.

The slot view here is derived from committed events only, seeded from the store at start, so publishing never
reads the database on the hot path. Availability is re-published at most once per lot per interval and always
ends on the true state.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import __version__
from gateway.core.clock import SYSTEM_CLOCK, Clock, iso_ms
from gateway.core.events import SessionEnded, SessionMoved, SessionStarted, SlotStatus
from gateway.mqtt.link import MqttLink
from gateway.mqtt.topics import Topics
from gateway.store.availability import fold
from gateway.store.reads import ReadStore
from gateway.store.writer import Committed, Writer

AVAILABILITY_EVERY = 0.5
HEALTH_EVERY = 30.0


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class _Slot:
    """One slot's published state. Compact, for 10,000s of slots on a Pi: slots instead of a dict, the words
    that repeat across slots interned, `since` a float until it is published."""

    __slots__ = ("lot", "sensor", "session", "since", "status", "type", "zone")

    def __init__(self, row: dict[str, Any]) -> None:
        self.lot: str = sys.intern(row["lot"])
        self.zone: str = sys.intern(row["zone"])
        self.type: str = sys.intern(row["type"])
        self.status: str = sys.intern(row["status"])
        self.since: float | str = row["since"]  # the store's time, or an event's `ts` (already ISO)
        self.sensor: str = sys.intern(row["sensor"])
        self.session: str | None = row["session"]

    def doc(self, slot_id: str) -> dict[str, Any]:
        return {
            "slot": slot_id,
            "lot": self.lot,
            "zone": self.zone,
            "type": self.type,
            "status": self.status,
            "since": iso_ms(self.since) if isinstance(self.since, float) else self.since,
            "sensor": self.sensor,
            "session": self.session,
        }


class Publisher:
    """Fed by the writer's commits; publishes events to the local link and retained state to every link
    (each link re-publishes its retained state itself after a reconnect)."""

    name = "publisher"

    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        reads: ReadStore,
        writer: Writer,
        *,
        health: Callable[[], Awaitable[dict[str, Any]]],
        clock: Clock = SYSTEM_CLOCK,
        availability_every: float = AVAILABILITY_EVERY,
    ) -> None:
        self._link = link
        self._topics = topics
        self._reads = reads
        self._writer = writer
        self._clock = clock
        self._health = health
        self._every = availability_every
        self.slots: dict[str, _Slot] = {}
        self.lots: list[str] = []
        self._counts: dict[str, Counter[tuple[str, str, str, str]]] = {}
        self.availability_docs: dict[str, dict[str, Any]] = {}  # the last published document per lot
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._mirrors: list[tuple[MqttLink, Topics]] = []
        self.events_published = 0

    def mirror(self, link: MqttLink, topics: Topics) -> None:
        """Keep the retained state on `link` too, under its own R (upstream); events reach it another way."""
        self._mirrors.append((link, topics))
        link.retain_view(topics.slot(""), self.slots.keys, self._slot_payload)
        for topic, payload in self._link.retained.items():
            if topic.startswith(f"{self._topics.root}/"):
                link.publish(self._mirrored(topic, topics), payload, qos=1, retain=True)

    async def start(self) -> None:
        """Seed the slot view from the store, follow the commits, queue every retained state."""
        async for row in self._reads.slots():
            self.slots[row["slot"]] = _Slot(row)
        self.lots = sorted({s.lot for s in self.slots.values()})
        # Slots per (zone, type, status, sensor) for each lot, kept in step with `slots`: an availability document
        # costs the number of zones and types, not the number of slots.
        self._counts = {lot: Counter() for lot in self.lots}
        for slot in self.slots.values():
            self._counts[slot.lot][self._key(slot)] += 1
        self._link.retain_view(self._topics.slot(""), self.slots.keys, self._slot_payload)
        self._writer.add_listener(self.on_commit)
        self.publish_all()

    async def stop(self) -> None:
        self._writer.remove_listener(self.on_commit)

    async def health(self) -> dict[str, Any]:
        return {"events_published": self.events_published}

    def publish_all(self) -> None:
        """Every retained state; the links re-publish them after each reconnect."""
        for slot_id in self.slots:
            self._publish_slot(slot_id)
        for lot in self.lots:
            self._publish_availability(lot)

    def retain(self, topic: str, payload: bytes) -> None:
        """Publish a retained state on every link (the local one and the mirrors), each under its own R."""
        self._link.publish(topic, payload, qos=1, retain=True)
        for link, topics in self._mirrors:
            link.publish(self._mirrored(topic, topics), payload, qos=1, retain=True)

    def _publish_slot(self, slot_id: str) -> None:
        # A view's topic: each link renders the slot's state when it sends it (_slot_payload).
        self._link.publish_view(self._topics.slot(slot_id))
        for link, topics in self._mirrors:
            link.publish_view(topics.slot(slot_id))

    def _slot_payload(self, slot_id: str) -> bytes | None:
        slot = self.slots.get(slot_id)
        return None if slot is None else _dumps(slot.doc(slot_id))

    def walk_in_available(self, lot: str, restricted: frozenset[str]) -> int:
        """Available slots of `lot` that a walk-in without a permit can get (the lane sign's FULL)."""
        return sum(
            n
            for (_, type_, status, _), n in self._counts.get(lot, {}).items()
            if status == "available" and type_ not in restricted
        )

    def _mirrored(self, topic: str, topics: Topics) -> str:
        return topics.root + topic[len(self._topics.root) :]

    @staticmethod
    def _key(slot: _Slot) -> tuple[str, str, str, str]:
        return slot.zone, slot.type, slot.status, slot.sensor

    def on_commit(self, done: Committed) -> None:
        """Writer listener: runs in the loop after COMMIT, never blocks."""
        touched: set[str] = set()
        for envelope in done.events:
            self._link.publish(self._topics.events, envelope.body, qos=1)
            self.events_published += 1
            match envelope.event:
                case SlotStatus(slot=slot_id, status=status, sensor=sensor) if slot_id in self.slots:
                    slot = self.slots[slot_id]
                    if status != slot.status or sensor != slot.sensor:
                        counts = self._counts[slot.lot]
                        counts[self._key(slot)] -= 1
                        if status != slot.status:
                            slot.since = envelope.ts  # as in the store: since the status, not the sensor, changed
                        slot.status = sys.intern(status)
                        slot.sensor = sys.intern(sensor)
                        counts[self._key(slot)] += 1
                        self._dirty.add(slot.lot)
                case SessionStarted(slot=str(slot_id), session_id=session_id) if slot_id in self.slots:
                    self.slots[slot_id].session = session_id
                case SessionEnded(slot=str(slot_id), session_id=session_id) if (
                    slot_id in self.slots and self.slots[slot_id].session == session_id
                ):
                    self.slots[slot_id].session = None
                case SessionMoved(session_id=session_id, from_slot=from_slot, to_slot=to_slot):
                    moved_from = self.slots.get(from_slot) if from_slot is not None else None
                    if from_slot is not None and moved_from is not None and moved_from.session == session_id:
                        moved_from.session = None
                        touched.add(from_slot)
                    if to_slot is not None and to_slot in self.slots:
                        self.slots[to_slot].session = session_id
                        touched.add(to_slot)
                    continue
                case _:
                    continue
            touched.add(slot_id)
        for slot_id in touched:
            self._publish_slot(slot_id)
        if self._dirty:
            self._wakeup.set()

    def _publish_availability(self, lot: str) -> None:
        rows = ((z, t, st, x, n) for (z, t, st, x), n in self._counts[lot].items() if n)
        doc = fold(lot, rows, self._clock.wall())
        self.availability_docs[lot] = doc
        self.retain(self._topics.availability(lot), _dumps(doc))

    async def run(self) -> None:
        await asyncio.gather(self._availability_loop(), self._health_loop())

    async def _availability_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            dirty, self._dirty = self._dirty, set()
            for lot in sorted(dirty):
                self._publish_availability(lot)
            # Changes during the pause set _dirty again and are published after it: the last state always goes out.
            await self._clock.sleep(self._every)

    async def _health_loop(self) -> None:
        while True:
            self.retain(self._topics.health, _dumps(await self._health()))
            await self._clock.sleep(HEALTH_EVERY)


def health_document(*, now: float, uptime_s: float, snapshots: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`R/health` (contract §3.2) from the services' snapshots: the contract's fields, and each service's own."""
    return {
        "ts": iso_ms(now),
        "uptime_s": round(uptime_s),
        "version": __version__,
        "queue_depth": snapshots["writer"]["queue_depth"],
        "outbox_backlog": snapshots["store"]["outbox_backlog"],
        "db_bytes": snapshots["store"]["db_bytes"],
        "devices": snapshots,
    }
