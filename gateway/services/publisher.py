"""Published state (contract §3.2): live events, retained slot states, coalesced availability, health.

The slot view here is derived from committed events only, seeded from the store at start, so publishing never
reads the database on the hot path. Availability is re-published at most once per lot per interval and always
ends on the true state.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import __version__
from gateway.core.clock import iso_ms
from gateway.mqtt.link import MqttLink
from gateway.mqtt.topics import Topics
from gateway.store.availability import fold
from gateway.store.writer import Committed

AVAILABILITY_EVERY = 0.5
HEALTH_EVERY = 30.0


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class Publisher:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        slots: list[dict[str, Any]],
        *,
        health: Callable[[], Awaitable[dict[str, Any]]],
        clock: Callable[[], float] = time.time,
        availability_every: float = AVAILABILITY_EVERY,
    ) -> None:
        self._link = link
        self._topics = topics
        self._clock = clock
        self._health = health
        self._every = availability_every
        self.slots: dict[str, dict[str, Any]] = {}
        for row in slots:
            self.slots[row["slot"]] = {
                "slot": row["slot"],
                "lot": row["lot"],
                "zone": row["zone"],
                "type": row["type"],
                "status": row["status"],
                "since": iso_ms(row["since"]),
                "sensor": row["sensor"],
                "session": row["session"],
            }
        self.lots = sorted({s["lot"] for s in self.slots.values()})
        # Slots per (zone, type, status) for each lot, kept in step with `slots`: an availability document
        # costs the number of zones and types, not the number of slots.
        self._counts: dict[str, Counter[tuple[str, str, str]]] = {lot: Counter() for lot in self.lots}
        for slot in self.slots.values():
            self._counts[slot["lot"]][(slot["zone"], slot["type"], slot["status"])] += 1
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self.events_published = 0

    def publish_all(self) -> None:
        """Every retained state; the link re-publishes them after each reconnect."""
        for slot in self.slots.values():
            self._link.publish(self._topics.slot(slot["slot"]), _dumps(slot), qos=1, retain=True)
        for lot in self.lots:
            self._publish_availability(lot)

    def on_commit(self, done: Committed) -> None:
        """Writer listener: runs in the loop after COMMIT, never blocks."""
        touched: set[str] = set()
        for event in done.events:
            self._link.publish(self._topics.events, _dumps(event), qos=1)
            self.events_published += 1
            slot_id = event.get("slot")
            slot = self.slots.get(slot_id) if isinstance(slot_id, str) else None
            if slot is None:
                continue
            kind = event["type"]
            if kind == "slot.status":
                if event["status"] != slot["status"]:
                    counts = self._counts[slot["lot"]]
                    counts[(slot["zone"], slot["type"], slot["status"])] -= 1
                    counts[(slot["zone"], slot["type"], event["status"])] += 1
                    slot["status"] = event["status"]
                    slot["since"] = event["ts"]  # as in the store: since the status, not the sensor, changed
                    self._dirty.add(slot["lot"])
                slot["sensor"] = event["sensor"]
            elif kind == "session.started":
                slot["session"] = event["session_id"]
            elif kind == "session.ended" and slot["session"] == event["session_id"]:
                slot["session"] = None
            else:
                continue
            touched.add(slot_id)  # type: ignore[arg-type]
        for slot_id in touched:
            self._link.publish(self._topics.slot(slot_id), _dumps(self.slots[slot_id]), qos=1, retain=True)
        if self._dirty:
            self._wakeup.set()

    def _publish_availability(self, lot: str) -> None:
        rows = ((z, t, st, n) for (z, t, st), n in self._counts[lot].items() if n)
        doc = fold(lot, rows, self._clock())
        self._link.publish(self._topics.availability(lot), _dumps(doc), qos=1, retain=True)

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
            await asyncio.sleep(self._every)

    async def _health_loop(self) -> None:
        while True:
            self._link.publish(self._topics.health, _dumps(await self._health()), qos=1, retain=True)
            await asyncio.sleep(HEALTH_EVERY)


def health_document(
    *, started: float, queue_depth: int, outbox_backlog: int, db_bytes: int, devices: dict[str, Any]
) -> dict[str, Any]:
    now = time.time()
    return {
        "ts": iso_ms(now),
        "uptime_s": round(now - started),
        "version": __version__,
        "queue_depth": queue_depth,
        "outbox_backlog": outbox_backlog,
        "db_bytes": db_bytes,
        "devices": devices,
    }
