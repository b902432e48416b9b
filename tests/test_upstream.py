"""The outbox forwarder against real Mosquitto brokers, directly and through a misbehaving TCP proxy.

Each outage test ends the same way: the upstream subscriber has seq 1..N, complete and in order after dedupe
by event_id, and the outbox is empty (every entry deleted after its PUBACK).

The broker outage lasts about 3 s rather than 30: during an outage the forwarder only waits for the link,
and the link only retries; what a longer outage adds is more failed attempts at the capped backoff. With the
backoff capped at 0.5 s here, 3 s is several failed attempts at the cap, as 30 s would be at the daemon's
30 s cap; the events produced meanwhile wait on disk either way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest

from gateway.store.schema import connect
from tests.conftest import MosquittoProcess
from tests.mqtt_proxy import MqttProxy, split_packets
from tests.nats import NatsNode
from tests.test_tls import Pki, pki  # noqa: F401 (the fixture)
from tests.upstream_rig import FAST, R_UP, Rig, persistent_mosquitto_conf, rig, subscriber, upstream_config

DEADLINE = 20.0


async def until(check: object, timeout: float = DEADLINE) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def drained(r: Rig) -> None:
    """Everything committed was acknowledged upstream and deleted."""
    await until(lambda: r.upstream.forwarder.health()["pending"] == 0 and not r.outbox())


def assert_complete(got: list[int], n: int) -> None:
    assert got == list(range(1, n + 1)), f"missing {sorted(set(range(1, n + 1)) - set(got))[:10]}"


async def test_events_reach_upstream_in_order_and_are_deleted_after_puback(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {mosquitto.port}")
    async with rig(cfg) as r, subscriber([("127.0.0.1", mosquitto.port)]) as sub:
        await r.upstream.link.wait_connected(DEADLINE)
        await r.sensor_flips(40)
        await r.visits(5)
        n = r.committed()
        await sub.until_seqs(n)
        await drained(r)
        assert_complete(sub.distinct(), n)
        assert sub.duplicates() == 0  # no outage, no duplicates
        assert {e["gateway"] for e in sub.events} == {"gw1"}
        assert r.upstream.link.protocol == 5  # "auto" against Mosquitto: MQTT 5


async def test_upstream_broker_stopped_while_events_are_produced(tmp_path: Path) -> None:
    with persistent_mosquitto_conf() as conf:
        await _outage(tmp_path, MosquittoProcess(tmp_path, conf))


async def _outage(tmp_path: Path, broker: MosquittoProcess) -> None:
    broker.start()
    try:
        cfg = upstream_config(tmp_path / "gw", f"host = '127.0.0.1'\nport = {broker.port}")
        async with rig(cfg) as r, subscriber([("127.0.0.1", broker.port)]) as sub:
            await r.upstream.link.wait_connected(DEADLINE)
            await r.sensor_flips(50)
            await sub.until_seqs(r.committed())
            await asyncio.to_thread(broker.stop)
            outage_end = time.monotonic() + 3.0
            while time.monotonic() < outage_end:
                await r.sensor_flips(10)
                await r.visits(1)
                await asyncio.sleep(0.1)
            assert not r.upstream.link.connected
            backlog = len(r.outbox())
            assert backlog > 100  # the outage's events wait on disk
            await asyncio.to_thread(broker.start)
            n = r.committed()
            await sub.until_seqs(n, timeout=30)
            await drained(r)
            assert_complete(sub.distinct(), n)
            assert r.upstream.link.reconnects >= 1
    finally:
        broker.stop()


async def test_blackholed_route_is_detected_and_nothing_is_lost(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
        cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {proxy.port}")
        async with rig(cfg) as r, subscriber([("127.0.0.1", mosquitto.port)]) as sub:
            await r.upstream.link.wait_connected(DEADLINE)
            await r.sensor_flips(30)
            await sub.until_seqs(r.committed())
            proxy.blackhole = True
            await r.sensor_flips(100)
            await r.visits(3)
            # keepalive 1 s: the dead route is noticed within about 2 s, then connects time out (3 s here)
            await until(lambda: not r.upstream.link.connected, timeout=10)
            await asyncio.sleep(1.0)
            assert len(r.outbox()) >= 100
            proxy.end_blackhole()
            n = r.committed()
            await sub.until_seqs(n, timeout=30)
            await drained(r)
            assert_complete(sub.distinct(), n)
            assert proxy.connections >= 2


async def test_connection_cut_mid_stream_again_and_again(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
        cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {proxy.port}")
        async with rig(cfg, replace(FAST, window=64)) as r:
            # a backlog first, so that the cuts land while it drains
            await r.upstream.link.wait_connected(DEADLINE)
            async with subscriber([("127.0.0.1", mosquitto.port)]) as sub:
                producer = asyncio.create_task(r.sensor_flips(6000))
                cuts, last_cut = 0, 0.0
                loop = asyncio.get_running_loop()
                # Bounded: a subscriber that never catches up is a failure to report, not a suite that hangs.
                async with asyncio.timeout(120):
                    while not producer.done() or sub.count < r.committed():
                        await asyncio.sleep(0.005)
                        # Each cut on a live connection with something in flight, at least 0.15 s apart: at a
                        # fixed moment the stream can be idle (a loaded machine) or already drained (an idle one),
                        # or still reconnecting, and a cut then resends nothing or counts no reconnect.
                        link, forwarder = r.upstream.link, r.upstream.forwarder
                        if cuts < 8 and loop.time() - last_cut >= 0.15 and link.connected and forwarder.in_flight:
                            proxy.cut()
                            cuts, last_cut = cuts + 1, loop.time()
                await producer
                n = r.committed()
                await sub.until_seqs(n, timeout=30)
                await drained(r)
                assert_complete(sub.distinct(), n)
                assert r.upstream.link.reconnects >= 4
                assert r.upstream.forwarder.resent > 0  # sent again after cuts: at least once, not exactly once


async def test_without_puback_nothing_is_deleted(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
        cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {proxy.port}")
        tuning = replace(FAST, ack_timeout=1.0, timeout=1.0)
        async with rig(cfg, tuning) as r, subscriber([("127.0.0.1", mosquitto.port)]) as sub:
            await r.upstream.link.wait_connected(DEADLINE)
            proxy.drop_pubacks = True
            await r.sensor_flips(100)
            n = r.committed()
            assert n < r.upstream.forwarder.window
            # The broker has them all (the subscriber got them) ...
            await sub.until_seqs(n)
            # ... but no PUBACK came back: past the ack timeout and through reconnects, every entry stays.
            await until(lambda: r.upstream.link.reconnects >= 2, timeout=15)
            assert [seq for seq, _ in r.outbox()] == list(range(1, n + 1))
            assert r.upstream.forwarder.health()["acked_seq"] == 0
            assert proxy.pubacks_dropped >= n
            proxy.drop_pubacks = False
            await drained(r)
            assert_complete(sub.distinct(), n)


async def test_requests_from_upstream_are_answered_upstream_with_the_same_idempotency(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {mosquitto.port}")
    async with (
        rig(cfg) as r,
        aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="central") as central,
    ):
        await r.upstream.link.wait_connected(DEADLINE)
        await central.subscribe(f"{R_UP}/response/#", qos=1)
        request = b'{"transaction": "t-1", "vehicle": "AB123CD", "lot": "lot1"}'
        replies = []
        async with asyncio.timeout(DEADLINE):
            for _ in range(2):
                await central.publish(f"{R_UP}/request/enter", request, qos=1)
                message = await anext(aiter(central.messages))
                assert message.topic.value == f"{R_UP}/response/enter"
                replies.append(bytes(message.payload))
        assert replies[0] == replies[1]  # the same transaction, the same answer, one session
        assert b'"status":"ok"' in replies[0]
        conn = connect(r.db, readonly=True)
        try:
            assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 1
        finally:
            conn.close()


async def test_requests_sent_while_the_gateway_is_away_wait_in_its_session(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
        cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {proxy.port}")
        async with (
            rig(cfg) as r,
            aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="central") as central,
        ):
            await r.upstream.link.wait_connected(DEADLINE)
            await central.subscribe(f"{R_UP}/response/#", qos=1)
            proxy.blackhole = True
            await until(lambda: not r.upstream.link.connected, timeout=10)
            await central.publish(f"{R_UP}/request/availability", b'{"transaction": "t-2", "lot": "lot1"}', qos=1)
            proxy.end_blackhole()
            async with asyncio.timeout(DEADLINE):
                message = await anext(aiter(central.messages))
            assert b'"transaction":"t-2"' in bytes(message.payload)


async def test_auto_falls_back_to_mqtt_311_when_the_broker_refuses_5(tmp_path: Path) -> None:
    node = NatsNode(tmp_path / "nats", "single")  # NATS's MQTT speaks 3.1.1 only and says so (code 132)
    node.start()
    try:
        cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {node.mqtt_port}\nmqtt_version = 'auto'")
        async with rig(cfg) as r:
            await r.upstream.link.wait_connected(DEADLINE)
            assert r.upstream.link.protocol == 3
            await r.sensor_flips(5)
            await drained(r)
    finally:
        node.stop()


def test_split_packets_finds_whole_packets_only() -> None:
    puback = bytes([0x40, 0x02, 0x00, 0x07])
    big = bytes([0x30, 0x80, 0x01]) + b"x" * 128  # remaining length 128 in two bytes
    buf = bytearray(puback + big + puback[:3])
    assert split_packets(buf) == [puback, big]
    assert buf == bytearray(puback[:3])
    buf += puback[3:]
    assert split_packets(buf) == [puback]
    with pytest.raises(ValueError, match="remaining length"):
        split_packets(bytearray([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))  # five length bytes: not MQTT


async def test_tls_upstream_is_verified_and_without_the_ca_nothing_is_sent(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    broker = MosquittoProcess(tmp_path, tls=(pki.ca, pki.server_cert, pki.server_key))
    broker.start()
    try:
        # `tls = {}`: the system CAs do not know the site's CA; the connection fails, the events stay.
        cfg = upstream_config(tmp_path / "a", f"host = 'localhost'\nport = {broker.port}\ntls = {{}}")
        async with rig(cfg) as r:
            await r.sensor_flips(3)
            await asyncio.sleep(1.0)  # several attempts at 0.05..0.5 s backoff, each refused by verification
            assert not r.upstream.link.connected
            assert r.upstream.forwarder.published == 0 and len(r.outbox()) == 6
        cfg = upstream_config(tmp_path / "b", f"host = 'localhost'\nport = {broker.port}\ntls = {{ ca = '{pki.ca}' }}")
        async with rig(cfg) as r:
            await r.upstream.link.wait_connected(DEADLINE)
            await r.sensor_flips(3)
            await drained(r)
    finally:
        broker.stop()


async def test_a_retained_request_upstream_is_no_decision(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="central") as central:
        await central.subscribe(f"{R_UP}/response/#", qos=1)
        old = b'{"transaction": "t-old", "vehicle": "AB123CD", "lot": "lot1"}'
        await central.publish(f"{R_UP}/request/enter", old, qos=1, retain=True)  # a broker's stored copy
        cfg = upstream_config(tmp_path, f"host = '127.0.0.1'\nport = {mosquitto.port}")
        async with rig(cfg) as r:
            await r.upstream.link.wait_connected(DEADLINE)
            await until(lambda: r.upstream.retained_rejected == 1)
            fresh = b'{"transaction": "t-new", "lot": "lot1"}'
            await central.publish(f"{R_UP}/request/availability", fresh, qos=1)
            async with asyncio.timeout(DEADLINE):
                reply = await anext(aiter(central.messages))
            assert b'"transaction":"t-new"' in bytes(reply.payload)
            assert not [t for _, t in r.outbox() if t == "session.started"]
        await central.publish(f"{R_UP}/request/enter", b"", qos=1, retain=True)
