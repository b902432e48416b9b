"""The daemon: wires the broker, the store, the writer and the MQTT link under one TaskGroup.

Start order: embedded broker -> writer (store open, config synced) -> read connection -> MQTT link (subscribes,
then publishes `online` and every retained state). Stop order is the reverse, so nothing is decided after the
link is gone and `offline` is the last word on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.core.domain import Housekeeping
from gateway.core.plates import PlateKey
from gateway.mqtt.acl import default_acl, load_acl
from gateway.mqtt.broker import BrokerOptions, EmbeddedBroker, usernames
from gateway.mqtt.link import Incoming, LinkOptions, MqttLink
from gateway.mqtt.topics import Topics, match
from gateway.services.ingress import Ingress
from gateway.services.publisher import Publisher, health_document
from gateway.services.requests import Requests
from gateway.store.reads import ReadStore
from gateway.store.schema import db_path
from gateway.store.writer import Writer

log = structlog.get_logger("gateway")

HOUSEKEEPING_EVERY = 300.0


def broker_options(config: GatewayConfig) -> BrokerOptions:
    b = config.broker
    if b.users_file is None:
        return BrokerOptions(host=b.host, port=b.port, allow_anonymous=b.allow_anonymous)
    users = usernames(b.users_file)
    if b.acl_file is not None:
        acl = load_acl(Path(b.acl_file), users)
    else:
        acl = default_acl(b.username, users, config.ingress.by_kind())
    return BrokerOptions(
        host=b.host,
        port=b.port,
        allow_anonymous=b.allow_anonymous,
        users_file=b.users_file,
        acl=acl.publish,
        subscribe_acl=acl.subscribe,
    )


def _secret(password: str | None, password_file: str | None) -> str | None:
    if password_file is not None:
        return Path(password_file).read_text(encoding="utf-8").strip()
    return password


class Gateway:
    """Everything one running gateway owns. `run()` returns when `stop()` is called or a task fails."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        state = config.state_path()
        state.mkdir(parents=True, exist_ok=True)
        self.key = PlateKey.load_or_create(config.plate_key_path())
        self.db = db_path(state)
        self.writer = Writer(self.db, config, self.key)
        self.topics = Topics(f"{config.gateway.topic_root}/{config.gateway.id}")
        self.ingress = Ingress(config, self.writer)
        self.link: MqttLink | None = None
        self.publisher: Publisher | None = None
        self.requests: Requests | None = None
        self.broker: EmbeddedBroker | None = None
        self.started = time.time()
        self._reads: ReadStore | None = None
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def wait_ready(self) -> None:
        """Until the store is open and the link has been started (not necessarily connected)."""
        await self._ready.wait()

    async def run(self) -> None:
        cfg = self.config
        async with contextlib.AsyncExitStack() as stack:
            if cfg.broker.embedded:
                self.broker = EmbeddedBroker(broker_options(cfg))
                await self.broker.start()
                stack.push_async_callback(self.broker.stop)
                log.info("embedded broker listening", host=cfg.broker.host, port=cfg.broker.port)
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(self.writer.run(), name="writer")
                await self.writer.wait_ready()
                reads = self._reads = await ReadStore.open(self.db)
                try:
                    await self._serve(tg, reads, writer)
                finally:
                    await reads.close()

    async def _serve(self, tg: asyncio.TaskGroup, reads: ReadStore, writer: asyncio.Task[None]) -> None:
        cfg = self.config
        slots = await reads.slots()
        self.ingress.seed({row["sensor_id"]: row["sensor"] for row in slots})
        self.requests = Requests(self.writer, reads, self.topics, {lot.id for lot in cfg.lots})
        b = cfg.broker
        self.link = link = MqttLink(
            LinkOptions(
                host=b.host,
                port=b.port,
                client_id=f"{cfg.gateway.id}-local",
                status_topic=self.topics.status,
                username=b.username,
                password=_secret(b.password, b.password_file),
                tls_ca=b.tls.ca if b.tls else None,
                tls_cert=b.tls.cert if b.tls else None,
                tls_key=b.tls.key if b.tls else None,
                subscriptions=(*self.ingress.subscriptions, (self.topics.requests, 1)),
                # amqtt speaks 3.1.1 only; an external broker gets what the config asks (5 by default).
                protocol=5 if not b.embedded and b.mqtt_version == "5" else 3,
            ),
            on_message=self._on_message,
            log=log,
        )
        self.requests.link = link
        self.publisher = publisher = Publisher(link, self.topics, slots, health=self._health)
        self.writer.add_listener(publisher.on_commit)
        publisher.publish_all()
        link_task = tg.create_task(link.run(), name="mqtt-local")
        helpers = [
            tg.create_task(self.ingress.run(), name="ingress"),
            tg.create_task(publisher.run(), name="publisher"),
            tg.create_task(self._housekeeping(), name="housekeeping"),
        ]
        self._ready.set()
        log.info("gateway started", gateway=cfg.gateway.id, store=str(self.db), slots=len(slots))
        await self._stop.wait()
        log.info("gateway stopping")
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await self.requests.close()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)

    async def _on_message(self, msg: Incoming) -> None:
        if match(self.topics.requests, msg.topic) is not None:
            assert self.requests is not None
            await self.requests.handle(msg)
        else:
            await self.ingress.handle(msg)

    async def _health(self) -> dict[str, Any]:
        assert self._reads is not None
        ing = self.ingress
        return health_document(
            started=self.started,
            queue_depth=self.writer.queue_depth,
            outbox_backlog=await self._reads.outbox_backlog(),
            db_bytes=self._reads.db_bytes(),
            devices={
                "accepted": dict(ing.accepted),
                "rejected": {f"{k}/{r}": n for (k, r), n in sorted(ing.rejected.items())},
                "sensor_messages": dict(ing.verdicts),
                "decisions": dict(ing.decisions),
                "mqtt": {
                    "connected": self.link.connected if self.link else False,
                    "reconnects": self.link.reconnects if self.link else 0,
                    "dropped": self.link.dropped if self.link else 0,
                    "queued": self.link.queue_depth if self.link else 0,
                },
            },
        )

    async def _housekeeping(self) -> None:
        while True:
            await self.writer.submit(Housekeeping())
            await asyncio.sleep(HOUSEKEEPING_EVERY)


async def run_daemon(config: GatewayConfig) -> int:
    gw = Gateway(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gw.stop)
    await gw.run()
    return 0
