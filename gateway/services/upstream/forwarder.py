"""The outbox forwarder (contract §7, guarantee 4): every committed event reaches upstream, in seq order.

It reads the outbox in `seq` order on its own read connection and publishes each entry with QoS 1 on the
upstream link, at most `window` in flight. An entry is deleted (a `ForgetEvents` command through the writer)
only once its PUBACK has arrived and every earlier entry's has too; a timeout never deletes anything. After a
reconnect it sends again from the oldest entry not acknowledged: at least once, in seq order (consumers
dedupe by `event_id`). It wakes on each commit (a writer listener), never polls, and touches nothing while
there is nothing to send.

While upstream is away the outbox grows on disk. Past `max_bytes` (body bytes, as `status` counts them) it
asks the writer to compact superseded `slot.status` events (`gateway.core.outbox`), and raises one `alert`
per outage; every other event is kept, even beyond the bound.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import aiosqlite
import structlog

from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.domain import CompactOutbox, ForgetEvents, RaiseAlert
from gateway.core.outbox import TARGET, TOMBSTONE, tombstone_event
from gateway.mqtt.link import Outlet
from gateway.store.writer import Committed, Writer, WriterClosed

log = structlog.get_logger("gateway.upstream")

WINDOW = 256  # publishes in flight: fills a WAN round trip; at most this many are sent again after a cut
PAGE = 512  # entries per read
ACK_TIMEOUT = 30.0  # no PUBACK for this long: the connection is dropped and the entries sent again
BOUND_EVERY = 1.0  # how often, while commits happen, the outbox's size is checked against the bound
_REFUSED = 0x80


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    payload: bytes


class Refused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code (MQTT 5): nothing is deleted, we retry."""


class Forwarder:
    """See the module docstring. `start`, then `run` (the background work) and, per connection, `serve`."""

    def __init__(
        self,
        db: Path,
        writer: Writer,
        *,
        gateway_id: str,
        events_topic: str,
        max_bytes: int,
        window: int = WINDOW,
        page: int = PAGE,
        ack_timeout: float = ACK_TIMEOUT,
        bound_every: float = BOUND_EVERY,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._db = db
        self._clock = clock
        self._writer = writer
        self._gateway = gateway_id
        self.topic = events_topic
        self.max_bytes = max_bytes
        self.window = window
        self._page = page
        self._ack_timeout = ack_timeout
        self._bound_every = bound_every
        self._conn: aiosqlite.Connection | None = None
        self._committed = 0  # highest seq committed (as far as the listener has told)
        self._acked = 0  # every entry up to here has its PUBACK
        self._forgotten = 0  # ... and is deleted from the outbox
        self._read_max = 0  # highest seq ever read: rows up to it may be on their way, compaction leaves them
        self._sent_max = 0
        self._wake = asyncio.Event()
        self._acks_to_forget = asyncio.Event()
        self._dirty = asyncio.Event()
        self._full_announced = False
        self._over_announced = False
        self._compact_cursor = 0
        self.connected = False
        self.in_flight = 0
        self.published = 0
        self.resent = 0
        self.refused = 0
        self.compactions = 0

    # --- lifecycle

    async def start(self) -> None:
        """Open the read connection and learn where the outbox stands; events committed from now on wake us."""
        self._writer.add_listener(self.on_commit)
        self._conn = await aiosqlite.connect(f"file:{self._db}?mode=ro", uri=True)
        await self._conn.execute("PRAGMA busy_timeout=5000")
        async with self._conn.execute("SELECT value FROM meta WHERE key = 'next_seq'") as cur:
            row = await cur.fetchone()
        assert row is not None
        self._committed = max(self._committed, int(row[0]) - 1)
        async with self._conn.execute("SELECT MIN(seq) FROM outbox") as cur:
            row = await cur.fetchone()
        # Entries below the oldest one left were forwarded (and deleted) before this start.
        oldest = row[0] if row is not None and row[0] is not None else self._committed + 1
        self._acked = self._forgotten = self._read_max = oldest - 1
        self._dirty.set()

    async def stop(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def run(self) -> None:
        """Deletes what upstream acknowledged and keeps the outbox within its bound; until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._forget_loop())
            tg.create_task(self._bound_loop())

    def on_commit(self, done: Committed) -> None:
        """Writer listener (in the loop, after COMMIT): there is more to send."""
        if not done.events:
            return  # a commit that only moved deadlines (sensor offline deadlines, for one) sent nothing
        last = done.events[-1].seq
        if last > self._committed:
            self._committed = last
        self._wake.set()
        self._dirty.set()

    def health(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "committed_seq": self._committed,
            "acked_seq": self._acked,
            "pending": self._committed - self._acked,
            "in_flight": self.in_flight,
            "published": self.published,
            "resent": self.resent,
            "refused": self.refused,
            "compactions": self.compactions,
        }

    # --- one connection

    async def serve(self, outlet: Outlet) -> None:
        """The link's session hook: forward until the connection ends (the link cancels us) or fails."""
        inflight: deque[tuple[int, asyncio.Future[int], float]] = deque()
        buffer: deque[_Entry] = deque()
        read_upto = self._acked  # everything not acknowledged is sent again, in order
        self.connected = True
        log.info("upstream.forwarding", from_seq=read_upto + 1, committed=self._committed)
        try:
            while True:
                self._wake.clear()
                self._settle(inflight)
                while len(inflight) < self.window:
                    if not buffer:
                        if self._committed <= read_upto:
                            break
                        committed = self._committed
                        rows = await self._read(read_upto)
                        if rows:
                            buffer.extend(rows)
                            read_upto = rows[-1].seq
                        if len(rows) < self._page:
                            # The read saw every commit up to `committed`: seqs below it not read are compacted.
                            read_upto = max(read_upto, committed)
                        self._read_max = max(self._read_max, read_upto)
                        continue
                    entry = buffer.popleft()
                    fut = outlet.publish(self.topic, entry.payload)
                    fut.add_done_callback(self._on_ack)
                    inflight.append((entry.seq, fut, self._clock.monotonic()))
                    self.published += 1
                    if entry.seq <= self._sent_max:
                        self.resent += 1
                    else:
                        self._sent_max = entry.seq
                self.in_flight = len(inflight)
                if not inflight and not buffer and self._committed <= read_upto:
                    self._caught_up()
                await self._wait(inflight)
        finally:
            self.connected = False
            self.in_flight = 0

    def _on_ack(self, _fut: asyncio.Future[int]) -> None:
        self._wake.set()

    def _settle(self, inflight: deque[tuple[int, asyncio.Future[int], float]]) -> None:
        """Acknowledged entries, in order, become deletable."""
        while inflight and inflight[0][1].done():
            seq, fut, _ = inflight.popleft()
            code = fut.result()
            if code >= _REFUSED:
                self.refused += 1
                log.error("upstream.publish_refused", seq=seq, reason_code=code)
                raise Refused(f"upstream refused event seq {seq} (reason code {code:#04x})")
            self._acked = seq
            self._acks_to_forget.set()

    async def _wait(self, inflight: deque[tuple[int, asyncio.Future[int], float]]) -> None:
        if not inflight:
            await self._wake.wait()
            return
        left = inflight[0][2] + self._ack_timeout - self._clock.monotonic()
        try:
            async with asyncio.timeout(max(left, 0)):
                await self._wake.wait()
        except TimeoutError:
            raise aiomqtt.MqttError(
                f"no PUBACK for seq {inflight[0][0]} within {self._ack_timeout:g} s; sending again"
            ) from None

    def _caught_up(self) -> None:
        # The outage (if there was one) is over: the next one is announced again.
        self._full_announced = self._over_announced = False

    async def _read(self, after: int) -> list[_Entry]:
        assert self._conn is not None
        async with self._conn.execute(
            "SELECT seq, event_id, type, created_at, body FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, self._page),
        ) as cur:
            rows = await cur.fetchall()
        out = []
        for seq, event_id, type_, created_at, body in rows:
            if type_ == TOMBSTONE:
                doc = tombstone_event(self._gateway, seq, event_id, created_at, body)
                body = json.dumps(doc, separators=(",", ":"))
            out.append(_Entry(seq, body.encode()))
        return out

    # --- background

    async def _forget_loop(self) -> None:
        while True:
            await self._acks_to_forget.wait()
            self._acks_to_forget.clear()
            upto = self._acked
            if upto <= self._forgotten:
                continue
            try:
                reply = await self._writer.submit(ForgetEvents(upto))
            except WriterClosed:
                return
            if reply.ok:
                self._forgotten = upto
            else:
                log.warning("upstream.forget_failed", upto=upto, error=reply.message)
                await self._clock.sleep(1.0)
                self._acks_to_forget.set()

    async def _bound_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                if await self.outbox_bytes() > self.max_bytes:
                    await self._compact()
            except WriterClosed:
                return
            await self._clock.sleep(self._bound_every)

    async def outbox_bytes(self) -> int:
        assert self._conn is not None
        async with self._conn.execute("SELECT bytes FROM outbox_size") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def _compact(self) -> None:
        """Chunks of compaction until the outbox is back under its target, or nothing is left to compact."""
        target = int(self.max_bytes * TARGET)
        while True:
            after = max(self._read_max, self._compact_cursor)
            reply = await self._writer.submit(
                CompactOutbox(self.max_bytes, after_seq=after, announce=not self._full_announced)
            )
            if not reply.ok:
                log.warning("upstream.compaction_failed", error=reply.message)
                return
            self._full_announced = True
            self.compactions += 1
            data = reply.data
            if data["removed"]:
                log.info("upstream.compacted", removed=data["removed"], outbox_bytes=data["bytes"])
            if data["exhausted"]:
                self._compact_cursor = 0  # later states supersede earlier ones anywhere: start over next time
                if data["bytes"] > self.max_bytes and not self._over_announced:
                    self._over_announced = True
                    await self._writer.submit(
                        RaiseAlert(
                            code="outbox.over_bound",
                            severity="critical",
                            subject={"outbox_bytes": data["bytes"], "max_bytes": self.max_bytes},
                            message="the outbox is past its bound with nothing left to compact: it keeps "
                            "growing (session, payment, gate and alert events are never dropped)",
                        )
                    )
                return
            self._compact_cursor = data["next_after"]
            if data["bytes"] <= target:
                return
