"""A store, its writer and the upstream service in the test's loop; an upstream subscriber that checks seq."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.config import GatewayConfig, parse_config
from gateway.core.domain import Enter, Exit, SensorChange, SensorChanges
from gateway.core.plates import PlateKey
from gateway.mqtt.link import Incoming, LinkOptions, MqttLink
from gateway.mqtt.topics import Topics
from gateway.services.requests import Requests
from gateway.services.upstream import Tuning, Upstream
from gateway.store.reads import ReadStore
from gateway.store.schema import connect, db_path
from gateway.store.settings import settings_from_config
from gateway.store.writer import Writer
from tests.helpers import new_writer

R_UP = "central/gw1"
FAST = Tuning(backoff_initial=0.05, backoff_max=0.5, timeout=3.0, ack_timeout=3.0, bound_every=0.1)


def upstream_config(
    state_dir: Path, upstream: str, *, slots: int = 20, extra: str = "", local_port: int = 1
) -> GatewayConfig:
    """One lot of `slots` slots; `upstream` is the body of the [upstream] table."""
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{state_dir}"
[broker]
embedded = false
port = {local_port}
[upstream]
topic_root = "central"
keepalive = 1
{upstream}
[timing]
debounce = 0.05
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-{slots:03d}" }}]
{extra}
"""
    )


@dataclass
class Rig:
    config: GatewayConfig
    writer: Writer
    upstream: Upstream
    _flip: dict[str, bool] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return db_path(self.config.state_path())

    def outbox(self) -> list[tuple[int, str]]:
        conn = connect(self.db, readonly=True)
        try:
            return [(int(s), str(t)) for s, t in conn.execute("SELECT seq, type FROM outbox ORDER BY seq")]
        finally:
            conn.close()

    def committed(self) -> int:
        conn = connect(self.db, readonly=True)
        try:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]) - 1
        finally:
            conn.close()

    async def sensor_flips(self, n: int, *, slots: int | None = None) -> None:
        """n sensor transitions, round robin over the lot's slots: n slot.status events (plus alerts)."""
        count = slots or len(self.config.slot_specs())
        ids = [s.sensor for s in self.config.slot_specs()][:count]
        changes = []
        for i in range(n):
            sensor = ids[i % count]
            occupied = not self._flip.get(sensor, False)
            self._flip[sensor] = occupied
            changes.append(SensorChange(sensor, "occupied" if occupied else "vacant", time.time()))
        for start in range(0, n, 128):
            await self.writer.submit(SensorChanges(changes=tuple(changes[start : start + 128])))

    async def visits(self, n: int) -> list[str]:
        """n enter+exit pairs; returns the session ids."""
        ids = []
        for i in range(n):
            plate = f"V{uuid.uuid4().hex[:8].upper()}{i}"
            reply = await self.writer.submit(Enter(vehicle=plate, lot="lot1"))
            assert reply.ok, reply
            ids.append(reply.data["session_id"])
            reply = await self.writer.submit(Exit(vehicle=plate))
            assert reply.ok, reply
        return ids


async def _ignore(_msg: Incoming) -> None:
    return


@contextlib.asynccontextmanager
async def rig(config: GatewayConfig, tuning: Tuning = FAST, *, start: bool = True) -> AsyncIterator[Rig]:
    """The writer and the upstream service (forwarder + connection) on a real store; `start=False`: the
    writer only (events pile up in the outbox), `Rig.upstream` built but not running."""
    writer = new_writer(config)
    writer_task = asyncio.create_task(writer.run())
    await writer.wait_ready()
    reads = ReadStore(db_path(config.state_path()))
    await reads.start()
    local = Topics(f"parking/{config.gateway.id}")
    # never connected: these tests look upstream only
    local_link = MqttLink(LinkOptions("127.0.0.1", 1, f"{config.gateway.id}-local", local.status), _ignore)
    requests = Requests(
        writer,
        reads,
        local,
        {lot.id for lot in config.lots},
        local_link,
        settings=settings_from_config(config),
        key=PlateKey(b"k" * 32),
    )
    upstream = Upstream(config, writer, db_path(config.state_path()), requests, tuning=tuning)
    run: asyncio.Task[None] | None = None
    if start:
        await upstream.start()
        run = asyncio.create_task(upstream.run())
    try:
        yield Rig(config, writer, upstream)
    finally:
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            await upstream.stop()
        await requests.stop()
        writer_task.cancel()
        await asyncio.gather(writer_task, return_exceptions=True)
        await reads.stop()


@dataclass
class Subscriber:
    """A persistent upstream subscriber of R/events: what a central platform would run. It dedupes by
    event_id as it goes; an `outbox.compacted` alert stands for every seq of its range."""

    events: list[dict[str, Any]] = field(default_factory=list)
    connects: int = 0
    _order: list[int] = field(default_factory=list)  # seqs of first arrivals, in arrival order
    _ids: set[str] = field(default_factory=set)
    _seqs: set[int] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["event_id"] in self._ids:
            return
        self._ids.add(event["event_id"])
        if event["type"] == "alert" and event["code"] == "outbox.compacted":
            covered = range(event["subject"]["from_seq"], event["subject"]["to_seq"] + 1)
        else:
            covered = range(event["seq"], event["seq"] + 1)
        for seq in covered:
            self._order.append(seq)
            self._seqs.add(seq)
        self._changed.set()

    @property
    def count(self) -> int:
        """Distinct seqs received."""
        return len(self._seqs)

    def distinct(self) -> list[int]:
        """Seqs once each, in order of first arrival."""
        return list(dict.fromkeys(self._order))

    def duplicates(self) -> int:
        return len(self.events) - len(self._ids)

    async def wait_for(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met; {self.count} distinct seqs received")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))
            await asyncio.sleep(0.01)  # check again at most every 10 ms, not on every message

    async def until_seqs(self, n: int, timeout: float = 20.0) -> None:
        await self.wait_for(lambda: self.count >= n, timeout)


@contextlib.asynccontextmanager
async def subscriber(
    nodes: list[tuple[str, int]], *, topic: str = f"{R_UP}/events", ident: str | None = None
) -> AsyncIterator[Subscriber]:
    """Subscribed (QoS 1, persistent session) before it returns; reconnects across `nodes` on its own."""
    sub = Subscriber()
    ident = ident or f"platform-{uuid.uuid4().hex[:6]}"
    subscribed = asyncio.Event()

    async def loop() -> None:
        i = 0
        while True:
            host, port = nodes[i % len(nodes)]
            i += 1
            try:
                async with aiomqtt.Client(host, port, identifier=ident, clean_session=False, timeout=5) as client:
                    await client.subscribe(topic, qos=1)
                    sub.connects += 1
                    subscribed.set()
                    async for message in client.messages:
                        sub.add(json.loads(bytes(message.payload)))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    task = asyncio.create_task(loop())
    try:
        async with asyncio.timeout(30):
            await subscribed.wait()
        yield sub
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.contextmanager
def persistent_mosquitto_conf() -> Iterator[str]:
    """Mosquitto lines that keep sessions and queued messages across a restart. Started as root, Mosquitto
    runs as its own user, which cannot enter pytest's private tmp_path: the store lives in /tmp instead."""
    store = Path(tempfile.mkdtemp(prefix="mosquitto-store-"))
    os.chmod(store, 0o777)
    try:
        yield f"persistence true\npersistence_location {store}/\nautosave_interval 1\n"
    finally:
        shutil.rmtree(store, ignore_errors=True)
