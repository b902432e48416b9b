"""The daemon as a process (`python -m gateway run`): killed with SIGKILL while it drains its outbox upstream,
restarted, and upstream still ends with every seq, in order; live events and upstream state after that."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiomqtt

from gateway.store.audit import audit
from gateway.store.schema import connect, db_path
from tests.conftest import MosquittoProcess, free_port
from tests.helpers import spawn_daemon, stop_daemon
from tests.upstream_rig import rig, subscriber, upstream_config


def outbox_rows(state: Path) -> int:
    conn = connect(db_path(state), readonly=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


async def test_kill_9_during_a_drain_then_restart(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    state = tmp_path / "state"
    local = free_port()
    body = f"host = '127.0.0.1'\nport = {mosquitto.port}"
    cfg = upstream_config(state, body, slots=200)
    # A backlog committed while there was no upstream: 20,000 events in the outbox.
    async with rig(cfg, start=False) as r:
        await r.sensor_flips(13_400)
        n = r.committed()
    assert n >= 20_000
    toml = tmp_path / "gateway.toml"
    text = (
        f'[gateway]\nid = "gw1"\nstate_dir = "{state}"\n'
        f"[broker]\nembedded = true\nallow_anonymous = true\nport = {local}\n"
        "[timing]\ndebounce = 0.05\n"
        f"[upstream]\ntopic_root = 'central'\nkeepalive = 5\n{body}\n"
        '[[lots]]\nid = "lot1"\n  [[lots.zones]]\n  id = "A"\n  slots = [{ ids = "A-001..A-200" }]\n'
    )
    toml.write_text(text)
    log = tmp_path / "daemon.log"
    async with subscriber([("127.0.0.1", mosquitto.port)]) as sub:
        first = spawn_daemon(toml, log)
        try:
            # Kill once the drain is under way: a fifth of the backlog acknowledged and deleted.
            deadline = time.monotonic() + 30
            while outbox_rows(state) > n * 0.8 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            stop_daemon(first)
        left = outbox_rows(state)
        got = sub.count
        assert 0 < left < n, f"the kill came too late or too early: {left} of {n} left, {got} received"
        second = spawn_daemon(toml, log)
        try:
            await sub.until_seqs(n, timeout=60)
            assert sub.distinct() == list(range(1, n + 1))
            deadline = time.monotonic() + 20
            while outbox_rows(state) and time.monotonic() < deadline:  # noqa: ASYNC110 (another process's store)
                await asyncio.sleep(0.1)
            assert outbox_rows(state) == 0
            # Live: a sensor report on the local broker becomes one more event upstream.
            async with aiomqtt.Client("127.0.0.1", local, identifier="sensor") as device:
                # each slot flipped 67 times: occupied now
                await device.publish("sensors/A-001/state", json.dumps({"occupied": False}), qos=1)
            await sub.wait_for(lambda: sub.count > n, timeout=20)
            assert sub.distinct()[n:][0] == n + 1
        finally:
            stop_daemon(second)
    conn = connect(db_path(state), readonly=True)
    try:
        assert audit(conn) == []
    finally:
        conn.close()
    assert b"Traceback" not in log.read_bytes()
