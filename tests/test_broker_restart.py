"""Broker restart while traffic flows: the gateway reconnects, retained state is back within 5 s, nothing is lost."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiomqtt

from gateway.app import Gateway
from gateway.store.audit import audit
from gateway.store.availability import availability
from tests.conftest import MosquittoProcess, free_port
from tests.harness import R, observer, running, site_config
from tests.helpers import reader


async def _traffic(port: int, stop: asyncio.Event, sent: list[str]) -> None:
    """A device that keeps publishing through the outage, reconnecting like a real one."""
    i = 0
    while not stop.is_set():
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier="traffic") as c:
                while not stop.is_set():
                    i += 1
                    slot = f"A-00{i % 6 + 1}"
                    await c.publish(f"sensors/{slot}/state", json.dumps({"occupied": i % 2 == 0}), qos=1)
                    if i % 5 == 0:
                        plate = f"CAR{i:04d}"
                        await c.publish("cameras/cam-in1/reads", json.dumps({"event_id": plate, "plate": plate}), qos=1)
                        sent.append(plate)
                    await asyncio.sleep(0.02)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


async def _restart_and_check(gw: Gateway, restart: object, port: int, tmp_cfg: object) -> None:
    stop = asyncio.Event()
    sent: list[str] = []
    traffic = asyncio.create_task(_traffic(port, stop, sent))
    await asyncio.sleep(1.0)
    assert gw.link is not None
    reconnects = gw.link.reconnects
    await restart()  # type: ignore[operator]
    t0 = time.monotonic()
    async with observer(port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online", timeout=5)
        await obs.wait_for(lambda: obs.state(f"{R}/lots/lot1/availability"), timeout=5)
        await obs.wait_for(lambda: obs.state(f"{R}/slots/B-002"), timeout=5)
        assert time.monotonic() - t0 < 5.0
        await asyncio.sleep(1.0)  # traffic flows on after the restart
        stop.set()
        await traffic
        await asyncio.sleep(0.6)  # one availability coalescing period, plus the last commits
        assert gw.link.reconnects > reconnects
        conn = reader(tmp_cfg)  # type: ignore[arg-type]
        assert audit(conn) == []
        committed = availability(conn, "lot1")
        await obs.wait_for(
            lambda: (
                {k: obs.state(f"{R}/lots/lot1/availability")[k] for k in ("available", "occupied")}
                == {k: committed[k] for k in ("available", "occupied")}
            ),
            timeout=5,
        )
        # Every slot's retained state is back and matches the store.
        for slot_id, status in conn.execute("SELECT id, status FROM slots"):
            assert obs.state(f"{R}/slots/{slot_id}")["status"] == status
        n_events, lo, hi = conn.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox").fetchone()
        assert (lo, hi) == (1, n_events)
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] >= 1


async def test_mosquitto_restart(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)

    async def restart() -> None:
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(mosquitto.start)

    async with running(cfg) as gw:
        await _restart_and_check(gw, restart, mosquitto.port, cfg)


async def test_embedded_broker_restart(tmp_path: Path) -> None:
    port = free_port()
    cfg = site_config(tmp_path / "state", port=port, embedded=True)
    async with running(cfg) as gw:
        assert gw.broker is not None

        async def restart() -> None:
            assert gw.broker is not None
            await gw.broker.stop()
            await asyncio.sleep(0.5)
            await gw.broker.start()

        await _restart_and_check(gw, restart, port, cfg)


async def test_gateway_restart_keeps_state(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    async with running(cfg), observer(mosquitto.port) as obs:
        reply = await obs.request("enter", {"vehicle": "KEEP1", "lot": "lot1"})
        assert reply["status"] == "ok"
    async with running(cfg), observer(mosquitto.port) as obs:
        slot = await obs.wait_for(lambda: obs.state(f"{R}/slots/{reply['data']['slot']}"))
        assert slot["session"] == reply["data"]["session_id"]
        again = await obs.request("enter", {"vehicle": "KEEP1", "lot": "lot1"})
        assert again["error"]["code"] == "already_active"
        events = await obs.wait_for(lambda: obs.events("entry.denied"))
        conn = reader(cfg)
        (last,) = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()
        conn.close()
        assert events[-1]["seq"] == last  # seq continues across restarts
