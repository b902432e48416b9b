"""InboundLink against a real Mosquitto: PUBACK after the handler is done, in arrival order, and bounded reads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from gateway.mqtt.inbound import Handled, InboundLink, InboundOptions, _matcher
from gateway.mqtt.link import Incoming
from tests.conftest import MosquittoProcess

DEADLINE = 10.0


class Held:
    """A handler that records every delivery and holds the ones on `held/...` until the test releases them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.waiting: list[asyncio.Future[bool]] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: Incoming) -> Handled:
        self.seen.append((message.topic, message.payload))
        self.changed.set()
        if not message.topic.startswith("held/"):
            return None
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return fut

    def release(self) -> None:
        for fut in self.waiting:
            if not fut.done():
                fut.set_result(True)
        self.waiting.clear()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()


def options(broker: MosquittoProcess, protocol: int, **overrides: object) -> InboundOptions:
    base: dict[str, object] = {
        "host": broker.address.host,
        "port": broker.address.port,
        "client_id": "gw1-local-in",
        "subscriptions": (("held/#", 1), ("free/#", 1), ("sync/#", 1)),
        "protocol": protocol,
        "persistent": True,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
    }
    base.update(overrides)
    return InboundOptions(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(link: InboundLink) -> AsyncIterator[None]:
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(DEADLINE):
            await link.subscribed.wait_set()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(broker: MosquittoProcess, *messages: tuple[str, bytes]) -> None:
    async with aiomqtt.Client(broker.address.host, broker.address.port, identifier="device") as device:
        for topic, payload in messages:
            await device.publish(topic, payload, qos=1)


async def settle_acks(link: InboundLink) -> None:
    """A SUBACK comes after every PUBACK sent before the SUBSCRIBE: the broker has processed them all."""
    assert link._client is not None
    await link._client.subscribe("sync/x", qos=1)


async def cut(link: InboundLink, reconnects: int) -> None:
    """The TCP connection dies under the client; wait for the link to be back, subscribed."""
    assert link._client is not None
    sock = link._client._client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    async with asyncio.timeout(DEADLINE):
        while not (link.reconnects > reconnects and link.subscribed.is_set()):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("protocol", [5, 3])
async def test_puback_waits_for_the_handler_and_keeps_arrival_order(mosquitto: MosquittoProcess, protocol: int) -> None:
    held = Held()
    link = InboundLink(options(mosquitto, protocol), held)
    async with running(link):
        await publish(mosquitto, ("held/c1", b"c1"), ("free/s1", b"s1"), ("free/s2", b"s2"))
        await held.until(3)
        await settle_acks(link)
        # c1 is not done: neither it nor what came after it is acknowledged, although s1 and s2 are.
        assert link.backlog == 3
        await cut(link, 0)
        await held.until(6)
        assert held.seen[3:] == [("held/c1", b"c1"), ("free/s1", b"s1"), ("free/s2", b"s2")]
        held.release()
        await publish(mosquitto, ("free/s3", b"s3"))
        await held.until(7)
        await settle_acks(link)
        assert link.backlog == 0
        await cut(link, 1)
        # Everything was acknowledged: the broker has nothing to send again.
        await publish(mosquitto, ("free/s4", b"s4"))
        await held.until(8)
        assert held.seen[6:] == [("free/s3", b"s3"), ("free/s4", b"s4")]


async def test_a_message_not_committed_comes_again(mosquitto: MosquittoProcess) -> None:
    held = Held()
    link = InboundLink(options(mosquitto, 5), held)
    async with running(link):
        await publish(mosquitto, ("held/c1", b"c1"), ("free/s1", b"s1"))
        await held.until(2)
        held.waiting.pop().set_result(False)  # the writer stopped before committing it
        await held.until(4)  # the link reconnected: the broker delivers both again
        assert held.seen[2:] == [("held/c1", b"c1"), ("free/s1", b"s1")]
        assert link.reconnects == 1
        held.release()


async def test_reads_pause_while_the_backlog_is_deep(mosquitto: MosquittoProcess) -> None:
    held = Held()
    link = InboundLink(options(mosquitto, 5, pause_at=20, resume_at=5, receive_maximum=1000), held)
    async with running(link):
        await publish(mosquitto, *((f"held/{n}", b"%d" % n) for n in range(200)))
        await held.until(20)
        await asyncio.sleep(0.3)  # time to read more, were reading not paused
        assert len(held.seen) == 20
        assert link.pauses == 1
        async with asyncio.timeout(DEADLINE):
            while len(held.seen) < 200:
                held.release()
                held.changed.clear()
                await held.changed.wait()
        held.release()
        assert [payload for _, payload in held.seen] == [b"%d" % n for n in range(200)]
        assert link.pauses > 1
        assert link.reconnects == 0


class Slow(Held):
    """Held, and the first message on `slow/...` keeps the handler busy until `go` is set: a backlog builds up."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def __call__(self, message: Incoming) -> Handled:
        if message.topic.startswith("slow/"):
            await self.go.wait()
        return await super().__call__(message)


async def test_priority_topics_are_handled_first_and_acknowledged_in_arrival_order(
    mosquitto: MosquittoProcess,
) -> None:
    """A camera read that arrives behind a backlog of sensor messages is handled next; the PUBACKs still follow
    the order of arrival: the sensor messages ahead of it are acknowledged, the read only once it is done."""
    handler = Slow()
    subscriptions = (("slow/#", 1), ("held/#", 1), ("free/#", 1), ("sync/#", 1))
    link = InboundLink(options(mosquitto, 5, subscriptions=subscriptions, priority=("held/#",)), handler)
    sensors = [(f"free/s{n}", b"%d" % n) for n in range(20)]
    async with running(link):
        await publish(mosquitto, ("slow/0", b"0"), *sensors, ("held/cam", b"c"))
        async with asyncio.timeout(DEADLINE):
            while link.received < 22:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        handler.go.set()
        await handler.until(22)
        assert handler.seen == [("slow/0", b"0"), ("held/cam", b"c"), *sensors]
        await settle_acks(link)
        assert link.backlog == 1  # the read: its commit is still to come
        await cut(link, 0)
        await handler.until(23)  # only the read comes again
        assert handler.seen[22:] == [("held/cam", b"c")]
        handler.release()
        await settle_acks(link)
        assert link.backlog == 0


def test_the_priority_matcher_follows_mqtt_filter_rules() -> None:
    matches = _matcher(("cameras/+/reads", "pr/+/platerecognizer", "x/#"))
    assert matches is not None
    assert matches("cameras/c1/reads") and matches("pr/c/platerecognizer") and matches("x") and matches("x/y/z")
    assert not matches("sensors/s1/state") and not matches("cameras/c1/other") and not matches("camerasX/c1/reads")
    wild = _matcher(("+/a",))
    assert wild is not None and wild("z/a") and not wild("z/b")
    assert _matcher(()) is None
