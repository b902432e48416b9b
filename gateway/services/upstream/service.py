"""The upstream service: one connection (client id `<gateway.id>-upstream`, a persistent session, its own
Last Will `offline` on R/status upstream) carrying the forwarded outbox, the retained state, and requests.

Requests arriving on `R/request/<verb>` upstream go to the same `Requests` as local ones (same validation, same
idempotency by transaction) and are answered on `R/response/<verb>` upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.mqtt.link import Incoming, MqttLink
from gateway.mqtt.topics import Topics, match
from gateway.services.requests import ReplyRoute, Requests
from gateway.services.upstream import forwarder
from gateway.services.upstream.connection import link_options, upstream_topics
from gateway.services.upstream.forwarder import Forwarder
from gateway.store.writer import Writer

log = structlog.get_logger("gateway.upstream")

Handler = Callable[[Incoming], Awaitable[None]]
# (kind, device, reason, detail): counts and records a rejected input, as Ingress.reject does
Reject = Callable[[str, str, str, str], None]


@dataclass(frozen=True, slots=True)
class Tuning:
    """Timings and sizes of the connection and the forwarder; the defaults are the daemon's."""

    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 10.0
    window: int = forwarder.WINDOW
    page: int = forwarder.PAGE
    ack_timeout: float = forwarder.ACK_TIMEOUT
    bound_every: float = forwarder.BOUND_EVERY


class Upstream:
    """A service (gateway/services/lifecycle.py): start after the writer and the requests, stop before them."""

    name = "upstream"

    def __init__(
        self,
        config: GatewayConfig,
        writer: Writer,
        db: Path,
        requests: Requests,
        *,
        routes: tuple[tuple[str, Handler], ...] = (),
        reject: Reject | None = None,
        tuning: Tuning = Tuning(),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """`routes`: further (filter, handler) pairs subscribed upstream (Home Assistant's status)."""
        up = config.upstream
        assert up is not None, "no [upstream] in the config"
        self.topics: Topics = upstream_topics(config)
        self._requests = requests
        self._reject = reject
        self.retained_rejected = 0
        self._routes = ((self.topics.requests, self._request), *routes)
        self.forwarder = Forwarder(
            db,
            writer,
            gateway_id=config.gateway.id,
            events_topic=self.topics.events,
            max_bytes=up.outbox_max_bytes,
            window=tuning.window,
            page=tuning.page,
            ack_timeout=tuning.ack_timeout,
            bound_every=tuning.bound_every,
            clock=clock,
        )
        self.link = MqttLink(
            link_options(
                config,
                subscriptions=tuple((f, 1) for f, _ in self._routes),
                extra_inflight=self.forwarder.window,
                backoff_initial=tuning.backoff_initial,
                backoff_max=tuning.backoff_max,
                timeout=tuning.timeout,
            ),
            on_message=self._on_message,
            on_session=self.forwarder.serve,
            log=log,
        )
        if up.tls is None:
            log.warning("upstream.plain_tcp", nodes=[f"{h}:{p}" for h, p in up.nodes()])

    async def start(self) -> None:
        await self.forwarder.start()

    async def run(self) -> None:
        """The connection and the forwarder's background work, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.forwarder.run(), name="upstream-forwarder")
            tg.create_task(self.link.run(), name="mqtt-upstream")

    async def stop(self) -> None:
        await self.forwarder.stop()

    async def health(self) -> dict[str, Any]:
        host, port = self.link.endpoint
        return {
            "connected": self.link.connected,
            "node": f"{host}:{port}",
            "protocol": "5" if self.link.protocol == 5 else "3.1.1",
            "reconnects": self.link.reconnects,
            "queued": self.link.queue_depth,
            "retained_requests_rejected": self.retained_rejected,
            "outbox": self.forwarder.health(),
        }

    async def _on_message(self, msg: Incoming) -> None:
        for topic_filter, handler in self._routes:
            if match(topic_filter, msg.topic) is not None:
                await handler(msg)
                return

    async def _request(self, msg: Incoming) -> None:
        if msg.retain:
            # A broker's stored copy of an old request (contract §3 v1.2): no decision, no reply.
            self.retained_rejected += 1
            if self._reject is not None:
                verb = msg.topic.rsplit("/", 1)[-1]
                self._reject("requests", verb, "retained", "a retained request from upstream is never a decision")
            return
        await self._requests.handle(msg, ReplyRoute(self.link, self.topics))
