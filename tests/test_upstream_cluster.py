"""A clustered upstream (contract §2 v1.2 `hosts`): three NATS JetStream nodes with the MQTT listener on loopback.

The gateway names two of them; a persistent subscriber sits on the third. The node the gateway is connected to
is killed (SIGKILL) mid-stream: the gateway moves to the next node with the same session (NATS keeps MQTT
sessions in JetStream, replicated), and the subscriber still ends with seq 1..N complete and in order after
dedupe. NATS speaks MQTT 3.1.1 only, so `mqtt_version = "auto"` falls back on the first connect. After a kill
the cluster elects new stream leaders (4-10 s here, sometimes more): connects and publishes time out
meanwhile, and the gateway keeps retrying without dropping anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from tests.nats import NatsNode, cluster
from tests.upstream_rig import FAST, Rig, rig, subscriber, upstream_config

# Timeouts long enough for a healthy cluster under load, short enough to move on during an election.
PATIENT = replace(FAST, timeout=5.0, ack_timeout=8.0, backoff_max=1.0)


@contextlib.contextmanager
def nats_cluster(workdir: Path) -> Iterator[list[NatsNode]]:
    nodes = cluster(workdir)
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_the_node_in_use_killed_mid_stream_nothing_lost(tmp_path: Path) -> None:
    with nats_cluster(tmp_path / "nats") as (n1, n2, n3):
        hosts = ", ".join(f'"127.0.0.1:{n.mqtt_port}"' for n in (n1, n2))
        cfg = upstream_config(tmp_path / "gw", f"hosts = [{hosts}]\nmqtt_version = 'auto'")
        async with subscriber([n3.mqtt, n2.mqtt]) as sub, rig(cfg, PATIENT) as r:
            link = r.upstream.link
            await link.wait_connected(60)  # the first MQTT connect creates NATS's streams: seconds
            assert link.protocol == 3 and link.endpoint == n1.mqtt

            async def produce() -> None:
                for _ in range(40):
                    await r.sensor_flips(20)
                    await asyncio.sleep(0.05)

            producer = asyncio.create_task(produce())
            await sub.wait_for(lambda: sub.count >= 200, timeout=60)
            n1.kill()  # mid-stream, with events in flight to it
            await producer
            n = r.committed()
            assert n == 1200
            await sub.until_seqs(n, timeout=90)
            assert sub.distinct() == list(range(1, n + 1))
            assert link.endpoint == n2.mqtt and link.reconnects >= 1
            await asyncio.wait_for(_drained(r), 30)


async def _drained(r: Rig) -> None:
    while r.outbox():  # noqa: ASYNC110 (the store is written by the code under test)
        await asyncio.sleep(0.1)
