"""Acknowledgement after commit and flow control through a real Mosquitto (contract §3 v1.2, §8 guarantee 3).

The daemon runs as `python -m gateway run` where a crash matters (kill -9 is the point), in-process otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
import structlog

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.mqtt.broker import hash_password
from gateway.store.audit import audit
from gateway.store.schema import connect, db_path
from tests.conftest import MosquittoProcess, free_port
from tests.harness import R, observer, running, site_config
from tests.helpers import reader, spawn_daemon, stop_daemon

DEADLINE = 20.0


def daemon_config(tmp_path: Path, port: int, *, mqtt_version: str, gates: int = 1, slots: int = 20) -> Path:
    entry = "".join(
        f'[[gates]]\nid = "in{g}"\nlot = "lot1"\ndirection = "entry"\ncamera = "cam-in{g}"\n'
        for g in range(1, gates + 1)
    )
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[broker]\nembedded = false\nport = {port}\nmqtt_version = "{mqtt_version}"\n'
        f'[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{{ ids = "A-001..A-{slots:03d}" }}]\n{entry}'
    )
    return path


class Daemon:
    """The real daemon in its own process; its log (JSON lines on stderr) goes to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.proc = spawn_daemon(config, log)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_daemon(self.proc)

    async def logged(self, text: str) -> None:
        async with asyncio.timeout(DEADLINE):
            while text not in self.log.read_text(errors="replace"):  # noqa: ASYNC110 (another process writes it)
                await asyncio.sleep(0.02)


@contextlib.contextmanager
def daemon(config: Path, log: Path) -> Iterator[Daemon]:
    d = Daemon(config, log)
    try:
        yield d
    finally:
        d.stop()


async def wait_online(port: int) -> None:
    async with asyncio.timeout(DEADLINE), observer(port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online", timeout=DEADLINE)


def read(camera: str, plate: str) -> tuple[str, bytes]:
    return f"cameras/{camera}/reads", json.dumps({"event_id": f"ev-{plate}", "plate": plate}).encode()


async def until_sessions(db: Path, count: int) -> list[tuple[str, int]]:
    """(plate, sessions of that plate) once the store holds `count` sessions."""
    async with asyncio.timeout(DEADLINE):
        while True:
            conn = connect(db, readonly=True)
            try:
                rows = conn.execute("SELECT plate, COUNT(*) FROM sessions GROUP BY plate ORDER BY plate").fetchall()
            finally:
                conn.close()
            if sum(n for _, n in rows) >= count:
                return [(p, n) for p, n in rows]
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def write_lock(db: Path) -> Iterator[None]:
    """Hold the store's write lock, as a stuck disk would: the daemon's writer waits (busy_timeout 5 s)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.parametrize("mqtt_version", ["3.1.1", "5"])
async def test_a_read_received_but_not_committed_survives_kill_9(
    tmp_path: Path, mosquitto: MosquittoProcess, mqtt_version: str
) -> None:
    port = mosquitto.port
    config = daemon_config(tmp_path, port, mqtt_version=mqtt_version)
    db = db_path(tmp_path / "state")
    with daemon(config, tmp_path / "first.log") as first:
        await wait_online(port)
        with write_lock(db):
            async with aiomqtt.Client("127.0.0.1", port, identifier="cam") as cam:
                await cam.publish(*read("cam-in1", "AB123CD"), qos=1)
                # Handled in arrival order: once the next message is rejected, the read is in the writer's hands.
                await cam.publish(*read("nobody", "XX000XX"), qos=1)
            await first.logged("cameras/nobody")
            first.kill()  # before the writer could commit the read
    with daemon(config, tmp_path / "second.log"):
        await wait_online(port)
        assert await until_sessions(db, 1) == [("AB123CD", 1)]
    assert audit(connect(db, readonly=True)) == []


async def test_kill_9_in_the_middle_of_100_reads_at_5_gates(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    port = mosquitto.port
    config = daemon_config(tmp_path, port, mqtt_version="5", gates=5, slots=120)
    db = db_path(tmp_path / "state")
    plates = [f"KL{n:03d}AA" for n in range(100)]
    accepted: list[str] = []

    async def cameras() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier="cameras") as client:
            for n, plate in enumerate(plates):
                await client.publish(*read(f"cam-in{n % 5 + 1}", plate), qos=1)
                accepted.append(plate)  # the broker PUBACKed it
                await asyncio.sleep(0.005)

    with daemon(config, tmp_path / "first.log") as first:
        await wait_online(port)
        publisher = asyncio.create_task(cameras())
        try:
            await until_sessions(db, 20)
            first.kill()
            await publisher
        finally:
            publisher.cancel()
    with daemon(config, tmp_path / "second.log"):
        sessions = await until_sessions(db, len(accepted))
        await asyncio.sleep(0.3)  # anything delivered twice would be committed by now
        sessions = await until_sessions(db, len(accepted))
    assert accepted == plates
    assert sessions == [(plate, 1) for plate in plates]
    conn = connect(db, readonly=True)
    started = conn.execute("SELECT COUNT(*) FROM outbox WHERE type = 'session.started'").fetchone()[0]
    assert started == len(plates)
    audit_run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "audit",
        "--config",
        str(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(audit_run.communicate(), 60)
    assert audit_run.returncode == 0, out.decode()


async def test_intake_stays_bounded_while_the_writer_is_stuck(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    count = 1000
    async with running(cfg) as gw:
        with write_lock(db_path(cfg.state_path())):
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="cam") as cam:
                cam.pending_calls_threshold = 100
                window = asyncio.Semaphore(64)

                async def one(n: int) -> None:
                    async with window:
                        await cam.publish(*read("cam-out1", f"EX{n:04d}"), qos=1)

                await asyncio.gather(*(one(n) for n in range(count)))
            await asyncio.sleep(0.3)  # time to take in more, were intake not bounded
            # Reads wait in the broker, not in the gateway: no more taken in than the window (here the broker's
            # Receive Maximum holds, as nothing is acknowledged; tests/test_inbound.py covers our own pause).
            assert gw.ingress.accepted["camera"] <= gw.inbound.options.pause_at
        async with asyncio.timeout(DEADLINE):
            while sum(gw.ingress.decisions.values()) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert gw.ingress.accepted["camera"] == count
    assert audit(reader(cfg)) == []


@pytest.mark.parametrize("version", ["3.1.1", "5"])
async def test_retained_reads_and_requests_are_no_decision(
    tmp_path: Path, mosquitto: MosquittoProcess, version: str
) -> None:
    port = mosquitto.port
    async with aiomqtt.Client("127.0.0.1", port, identifier="before") as dev:
        # Left on the broker before the gateway subscribes: delivered with the retain flag.
        await dev.publish(*read("cam-in1", "RT111AA"), qos=1, retain=True)
        await dev.publish("sensors/A-001/state", b'{"occupied": true}', qos=1, retain=True)
    cfg = site_config(tmp_path / "state", port=port, embedded=False, broker_extra=f'mqtt_version = "{version}"')
    stored = 0
    for run in ("first start", "restart"):
        async with running(cfg) as gw, observer(port) as obs:
            reads, requests = 1, 0  # the broker's copy of the read (one per topic), on subscribing
            if version == "5":
                requests = 1  # the request below, live, then the broker's copy after the restart
                if run == "first start":
                    # While subscribed, MQTT 5's retain-as-published shows the flag.
                    await obs.pub(*read("cam-in1", "RT222BB"), retain=True)
                    enter = {"transaction": "t1", "vehicle": "RT333CC", "lot": "lot1"}
                    await obs.pub(f"{R}/request/enter", enter, retain=True)
                    reads = 2
            await obs.wait_for(lambda: (obs.state(f"{R}/slots/A-001") or {}).get("sensor") == "occupied")
            await obs.wait_for(lambda: gw.ingress.rejected[("cameras", "retained")] == reads)  # noqa: B023
            await obs.wait_for(lambda: gw.ingress.rejected[("requests", "retained")] == requests)  # noqa: B023
            assert gw.ingress.decisions == {}
            assert not any(t.startswith(f"{R}/response/") for t, _, _ in obs.messages)
            # The rejection log reaches the store once a second.
            stored += reads + requests
            await obs.wait_for(lambda: stored_rejections(cfg) == stored, timeout=5)  # noqa: B023
    conn = reader(cfg)
    assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0
    assert {r for (r,) in conn.execute("SELECT DISTINCT reason FROM rejections")} == {"retained"}
    assert audit(conn) == []


def stored_rejections(cfg: GatewayConfig) -> int:
    conn = reader(cfg)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM rejections WHERE reason = 'retained'").fetchone()[0])
    finally:
        conn.close()


async def test_online_only_once_every_subscription_is_granted(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"gateway:{hash_password('gw-pw')}\n")
    acl = tmp_path / "acl"
    # The gateway's account may not subscribe to camera reads: the broker refuses that filter (SUBACK 0x80).
    acl.write_text("user gateway\ntopic readwrite parking/#\ntopic read sensors/#\ntopic read v3/#\ntopic write #\n")
    cfg = site_config(
        tmp_path / "state",
        port=free_port(),
        embedded=True,
        broker_extra=f'allow_anonymous = false\nusers_file = "{users}"\nacl_file = "{acl}"\n'
        'username = "gateway"\npassword = "gw-pw"',
    )
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(gw.wait_ready(), DEADLINE)
            async with observer(cfg.broker.port, username="gateway", password="gw-pw") as obs:
                # Asked again with backoff: two refusals, and meanwhile the gateway never says `online`.
                await obs.wait_for(lambda: sum(e.get("filter") == "cameras/+/reads" for e in logs) >= 2)
                assert obs.state(f"{R}/status") != "online"
                assert gw.inbound.refused == {"cameras/+/reads", "cameras/+/platerecognizer"}
        refusals = [e for e in logs if e["event"] == "mqtt.subscription_refused"]
        assert {e["filter"] for e in refusals} == {"cameras/+/reads", "cameras/+/platerecognizer"}
        assert all(e["log_level"] == "error" for e in refusals)
    finally:
        gw.stop()
        await asyncio.wait_for(task, DEADLINE)
