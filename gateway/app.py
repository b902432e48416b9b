"""The daemon: one ordered list of services (gateway/services/lifecycle.py), started in order, stopped in reverse.

Order: embedded broker -> MQTT output link -> writer (store open, config synced) -> read connection -> requests ->
upstream (when configured) -> ingress -> publisher -> lanes (serial barrier controllers) -> housekeeping ->
deadlines -> MQTT input link. Nothing runs until all have started, so the output link announces `online` only once
the store is open (and once the input link's subscriptions are granted); stopping in reverse means the input stops
first (nothing new is decided, what is being committed is still acknowledged), nothing is decided after the writer
is gone, every reply of its last commit is queued before the output link flushes and says `offline`, and `offline`
is the last word. The upstream connection stops before the requests and the writer: its forwarder needs both.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import structlog

from gateway.config import GatewayConfig
from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.plates import PlateKey
from gateway.mqtt.broker import EmbeddedBroker
from gateway.mqtt.inbound import Handled, InboundLink, InboundOptions
from gateway.mqtt.link import Incoming, LinkOptions, MqttLink
from gateway.mqtt.local import broker_options, broker_warnings, local_tls
from gateway.mqtt.topics import Topics, match
from gateway.services.deadlines import Deadlines
from gateway.services.homeassistant import HomeAssistant
from gateway.services.housekeeping import Housekeeping
from gateway.services.ingress import Ingress
from gateway.services.lanes import Lanes
from gateway.services.lifecycle import Service, serve
from gateway.services.publisher import Publisher, health_document
from gateway.services.requests import Requests
from gateway.services.systemd import Systemd
from gateway.services.upstream import Upstream
from gateway.store.reads import ReadStore
from gateway.store.schema import db_path
from gateway.store.settings import settings_from_config
from gateway.store.state import StateLock, private_dir
from gateway.store.writer import Writer

log = structlog.get_logger("gateway")

QUEUE_MAX = 10_000  # events and replies waiting for the broker, beside the retained states


def settle_heap() -> None:
    """What start-up built lives as long as the daemon: take it out of the cyclic collector's way.

    A full collection walks every tracked object with the GIL held, a stall of the loop and the writer alike:
    30-35 ms with the start-up heap on the dev machine, about 2 ms once it is frozen (bench/README.md, Lane).
    """
    gc.collect()
    gc.freeze()


def _secret(password: str | None, password_file: str | None) -> str | None:
    if password_file is not None:
        return Path(password_file).read_text(encoding="utf-8").strip()
    return password


class Gateway:
    """Everything one running gateway owns. `run()` returns when `stop()` is called or a service fails."""

    def __init__(
        self, config: GatewayConfig, *, clock: Clock = SYSTEM_CLOCK, on_started: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self._on_started = on_started
        state = config.state_path()
        private_dir(state)
        self.lock = StateLock(state)
        self.key = PlateKey.load_or_create(config.plate_key_path())
        self.db = db_path(state)
        self.topics = Topics(f"{config.gateway.topic_root}/{config.gateway.id}")
        self.started = clock.monotonic()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()

        b = config.broker
        self.broker = EmbeddedBroker(broker_options(config)) if b.embedded else None
        embedded = self.broker.options if self.broker is not None else None
        own = embedded.gateway_account if embedded is not None else None
        username, password = own or (b.username, _secret(b.password, b.password_file))
        self.writer = Writer(self.db, config, self.key, clock=clock)
        self.reads = ReadStore(self.db)
        self.ingress = Ingress(config, self.writer, self.reads, clock=clock)
        tls = local_tls(config, embedded)
        # amqtt speaks 3.1.1 only; an external broker gets what the config asks (5 by default).
        protocol: Literal[3, 5] = 5 if not b.embedded and b.mqtt_version == "5" else 3
        ha = config.homeassistant
        # Home Assistant's birth topic, subscribed on the broker it listens to (local or upstream)
        self._ha_status = f"{ha.prefix}/status" if ha is not None else ""
        ha_local = ((self._ha_status, 1),) if ha is not None and ha.broker == "local" else ()
        # Device input and requests on a connection of their own (docs/design-notes.md, "Two connections"):
        # its reads pause under a deep backlog, which must not hold back the PUBACKs of our own publishes.
        self.inbound = InboundLink(
            InboundOptions(
                host=b.host,
                port=b.port,
                client_id=f"{config.gateway.id}-local-in",
                subscriptions=(
                    *self.ingress.subscriptions,
                    (self.topics.requests, 1),
                    (self.topics.gate_opens, 1),
                    *ha_local,
                ),
                priority=self.ingress.decision_topics,
                username=username,
                password=password,
                tls=tls,
                protocol=protocol,
                # The bundled broker lives and dies with this process: a session it kept would buy nothing.
                persistent=not b.embedded,
            ),
            on_message=self._on_message,
            log=log,
        )
        self.link = MqttLink(
            LinkOptions(
                host=b.host,
                port=b.port,
                client_id=f"{config.gateway.id}-local",
                status_topic=self.topics.status,
                username=username,
                password=password,
                tls=tls,
                protocol=protocol,
                # Retained states (one per slot, lot, ...) are never dropped, so the bound is for the rest: below
                # the number of slots it would be exceeded by the start's own states and scanned on every publish.
                queue_max=QUEUE_MAX + len(config.slot_specs()) + len(config.lots) + len(config.gates) + 16,
            ),
            on_message=_no_input,
            log=log,
            name="mqtt-local",
            online_when=self.inbound.subscribed,
        )
        self.requests = Requests(
            self.writer,
            self.reads,
            self.topics,
            {lot.id for lot in config.lots},
            self.link,
            response_topics=tuple(b.response_topics),
            settings=settings_from_config(config),
            key=self.key,
            clock=clock,
        )
        self.upstream = (
            Upstream(
                config,
                self.writer,
                self.db,
                self.requests,
                routes=((self._ha_status, self._ha_birth),) if ha is not None and ha.broker == "upstream" else (),
                reject=self.ingress.reject,
                clock=clock,
            )
            if config.upstream
            else None
        )
        self.publisher = Publisher(self.link, self.topics, self.reads, self.writer, health=self._health, clock=clock)
        if self.upstream is not None:
            self.publisher.mirror(self.upstream.link, self.upstream.topics)
        self.homeassistant: HomeAssistant | None = None
        if ha is not None:
            # Home Assistant's broker: the local one, or upstream (the config requires [upstream] for it).
            if ha.broker == "upstream" and self.upstream is not None:
                self.homeassistant = HomeAssistant(config, self.upstream.link, self.upstream.topics)
            else:
                self.homeassistant = HomeAssistant(config, self.link, self.topics)
        self.lanes = Lanes(config, self.writer, self.reads, self.publisher, self.topics, clock=clock)
        self.housekeeping = Housekeeping(self.writer, clock=clock)
        self.deadlines = Deadlines(self.writer, clock=clock)
        self.systemd = Systemd(self.link, self.writer, clock=clock)

    def services(self) -> list[Service]:
        """In start order; adding a service is one line here."""
        return [
            *([self.broker] if self.broker is not None else []),
            self.link,
            self.writer,
            self.reads,
            self.requests,
            *([self.upstream] if self.upstream is not None else []),
            self.ingress,
            self.publisher,
            self.lanes,  # after the publisher: its lot counts decide the FULL signs
            *([self.homeassistant] if self.homeassistant is not None else []),
            self.housekeeping,
            self.deadlines,
            self.inbound,
            self.systemd,  # last: READY=1 once everything runs, STOPPING=1 first on the way down
        ]

    def stop(self) -> None:
        self._stop.set()

    async def wait_ready(self) -> None:
        """Until every service has started (the link may still be connecting)."""
        await self._ready.wait()

    async def run(self) -> None:
        # One daemon per store (guarantee 7): before any service starts, the embedded broker's listener too.
        self.lock.acquire()
        for warning in broker_warnings(self.config):
            log.warning(warning)
        if self.broker is not None:
            log.info("embedded broker", host=self.config.broker.host, port=self.config.broker.port)
        try:
            await serve(self.services(), self._stop, self._ready, on_started=self._on_started)
        finally:
            self.lock.release()

    async def _ha_birth(self, msg: Incoming) -> None:
        if self.homeassistant is not None:
            await self.homeassistant.on_status(msg)

    async def _on_message(self, msg: Incoming) -> Handled:
        if self._ha_status and msg.topic == self._ha_status:
            await self._ha_birth(msg)
            return None
        opens = match(self.topics.gate_opens, msg.topic)
        if opens is not None:
            if msg.retain:
                # A stored copy of an old button press (contract §3.4: every non-retained message is one open).
                self.ingress.reject("gates", opens[0], "retained", "a retained open is never a decision")
                return None
            return await self.lanes.handle_open(opens[0])
        levels = match(self.topics.requests, msg.topic)
        if levels is None:
            return await self.ingress.handle(msg)
        if msg.retain:
            # A broker's stored copy of an old request (contract §3 v1.2): no decision, no reply.
            self.ingress.reject("requests", levels[0], "retained", "a retained request is never a decision")
            return None
        return await self.requests.handle(msg)

    async def _health(self) -> dict[str, Any]:
        snapshots = {service.name: await service.health() for service in self.services()}
        return health_document(
            now=self.clock.wall(), uptime_s=self.clock.monotonic() - self.started, snapshots=snapshots
        )


async def _no_input(msg: Incoming) -> None:
    """The output link subscribes to nothing."""


async def run_daemon(config: GatewayConfig) -> int:
    gw = Gateway(config, on_started=settle_heap)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, gw.stop)
    await gw.run()
    return 0
