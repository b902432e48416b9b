"""The embedded broker under a burst: every message it acknowledged reaches every subscriber, through the real
amqtt broker built from a gateway config (the ACL on), with 64 QoS 1 publishes in flight as the devices and
the ingest benchmark send them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt

from gateway.config import GatewayConfig, parse_config
from gateway.mqtt.broker import BrokerOptions, EmbeddedBroker
from gateway.mqtt.local import broker_options
from tests.conftest import free_port
from tests.harness import site_config

IN_FLIGHT = 64
# Enough that amqtt's reader is far ahead of its delivery loop when the publisher disconnects (about half of
# them were still queued on the code before the fix), few enough for a second or two here.
BURST = 2000
DEADLINE = 10.0


def default_rule_site(tmp_path: Path) -> GatewayConfig:
    """The daemon's own setting: no ACL file (the default rule), anonymous devices."""
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{tmp_path / "state"}"
[broker]
port = {free_port()}
allow_anonymous = true
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-002" }}]
"""
    )


@contextlib.asynccontextmanager
async def broker(cfg: GatewayConfig) -> AsyncIterator[BrokerOptions]:
    options = broker_options(cfg)
    async with EmbeddedBroker(options):
        yield options


def client(options: BrokerOptions, ident: str, account: tuple[str, str] | None = None) -> aiomqtt.Client:
    user, password = account or (None, None)
    return aiomqtt.Client(
        "127.0.0.1",
        options.port,
        identifier=ident,
        username=user,
        password=password,
        max_inflight_messages=IN_FLIGHT,
        max_queued_outgoing_messages=IN_FLIGHT,
    )


async def burst(pub: aiomqtt.Client, count: int) -> None:
    """`count` QoS 1 publishes, IN_FLIGHT at a time; returns once the broker has acknowledged every one."""
    window = asyncio.Semaphore(IN_FLIGHT)

    async def one(n: int) -> None:
        async with window:
            await pub.publish(f"sensors/S{n % 100}/state", str(n), qos=1)

    await asyncio.gather(*(one(n) for n in range(count)))


async def receive(sub: aiomqtt.Client, count: int) -> list[int]:
    got: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DEADLINE):
            async for message in sub.messages:
                got.append(int(bytes(message.payload)))
                if len(got) == count:
                    break
    return got


async def test_a_burst_reaches_the_subscriber_when_its_publisher_disconnects_at_once(tmp_path: Path) -> None:
    # The test sites' ACL file (anonymous clients may do everything). amqtt acknowledges a publish on receipt
    # and queues it for the session's delivery loop; the publisher leaves right after its last PUBACK.
    async with broker(site_config(tmp_path / "state", port=free_port(), embedded=True)) as options:
        async with client(options, "display") as sub:
            await sub.subscribe("sensors/+/state", qos=1)
            received = asyncio.create_task(receive(sub, BURST))
            async with client(options, "sensor-burst") as pub:
                await burst(pub, BURST)
            assert await received == list(range(BURST))


async def test_a_burst_reaches_the_gateways_account_under_the_default_rule(tmp_path: Path) -> None:
    # The daemon's path: anonymous devices publish their ingress topics, the gateway's in-process account reads.
    async with broker(default_rule_site(tmp_path)) as options:
        assert options.gateway_account is not None
        async with client(options, "gw1-local-in", options.gateway_account) as sub:
            await sub.subscribe("sensors/+/state", qos=1)
            received = asyncio.create_task(receive(sub, BURST))
            async with client(options, "sensor-burst") as pub:
                await burst(pub, BURST)
            assert await received == list(range(BURST))


def _field(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _packet(kind: int, body: bytes) -> bytes:
    length, remaining = b"", len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        length += bytes([digit | (0x80 if remaining else 0)])
        if not remaining:
            return bytes([kind]) + length + body


async def wake_publish_sleep(
    port: int, client_id: str, count: int, *, will: bytes | None = None, config: str | None = None
) -> int:
    """A battery sensor's connection: CONNECT, `count` QoS 1 PUBLISHes and DISCONNECT in one write (MQTT lets a
    client send before its CONNACK). With `will`, no DISCONNECT: the connection just ends, the will (on
    `sensors/<client_id>/will`) is due. Returns the number of PUBACKs, once the broker has closed the connection."""
    flags = 0x02 | (0x04 | 0x08 if will is not None else 0)  # clean session; will at QoS 1
    connect = _field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + _field(client_id.encode())
    if will is not None:
        connect += _field(f"sensors/{client_id}/will".encode()) + _field(will)
    data = _packet(0x10, connect)
    if config is not None:
        data += _packet(0x82, struct.pack("!H", 1) + _field(config.encode()) + b"\x01")  # SUBSCRIBE at QoS 1
    for n in range(count):
        data += _packet(
            0x32, _field(f"sensors/{client_id}/state".encode()) + struct.pack("!H", n + 1) + str(n).encode()
        )
    if will is None:
        data += b"\xe0\x00"  # DISCONNECT
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        writer.write_eof()  # a client closes its side after DISCONNECT [MQTT-3.14.4-1]; without, the will is due
        answer = b""
        async with asyncio.timeout(DEADLINE):
            while chunk := await reader.read(65536):
                answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    assert answer[:4] == b"\x20\x02\x00\x00"  # CONNACK, accepted
    return answer[4:].count(b"\x40\x02")


async def test_what_a_client_sent_before_it_left_is_delivered_in_order(tmp_path: Path) -> None:
    # amqtt read all of it, acknowledged each PUBLISH and queued it, then its loop saw the DISCONNECT first and
    # dropped the queue; with the connection ending abnormally, the will went out before the messages.
    count = 200
    async with broker(site_config(tmp_path / "state", port=free_port(), embedded=True)) as options:
        async with client(options, "display") as sub:
            await sub.subscribe("sensors/#", qos=1)
            await sub.publish("config/S1", b"{}", qos=1, retain=True)
            assert await wake_publish_sleep(options.port, "S1", count, config="config/S1") == count
            assert await wake_publish_sleep(options.port, "S2", count, will=b"gone") == count
            got: list[str] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DEADLINE):
                    async for message in sub.messages:
                        if message.topic.value.startswith("sensors/"):
                            got.append(f"{message.topic.value} {bytes(message.payload).decode()}")
                        if message.topic.value == "sensors/S2/will":
                            break
    expected = [f"sensors/{s}/state {n}" for s in ("S1", "S2") for n in range(count)]
    assert got == [*expected, "sensors/S2/will gone"]


async def test_clients_leaving_during_a_burst_cost_the_others_nothing(tmp_path: Path) -> None:
    # amqtt drops a disconnected clean session's subscriptions once a second, from another task; a broadcast
    # that was waiting on the ACL then met a changed subscription table and gave up on the subscribers after it.
    filters = ["sensors/#", "sensors/+/state", "+/+/state", "sensors/+/+", "#"]
    async with broker(site_config(tmp_path / "state", port=free_port(), embedded=True)) as options:
        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(client(options, f"display-{i}")) for i in range(len(filters))]
            for sub, topic_filter in zip(subs, filters, strict=True):
                await sub.subscribe(topic_filter, qos=1)
            received = [asyncio.create_task(receive(sub, BURST)) for sub in subs]
            stop = asyncio.Event()

            async def come_and_go() -> None:
                for n in itertools.count():
                    async with client(options, f"passer-by-{n}") as passer_by:
                        await passer_by.subscribe(f"passers-by/{n}", qos=1)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.05)
                    if stop.is_set():
                        return

            churn = asyncio.create_task(come_and_go())
            # This publisher stays until everyone has everything: only the subscription table changes.
            async with client(options, "sensor-burst") as pub:
                await burst(pub, BURST)
                results = [await task for task in received]
            stop.set()
            await churn
        assert [len(got) for got in results] == [BURST] * len(filters)
        assert all(got == list(range(BURST)) for got in results)
