"""Lanes across gateway restarts: controller events applied once, and OPENs decided before a `kill -9` sent after it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.core.clock import ManualClock
from gateway.store.audit import audit
from gateway.store.schema import connect, db_path
from simulators.barrier import BarrierSim, BarrierState, Timings, wire
from tests.conftest import free_port
from tests.gcp1_helpers import until
from tests.harness import Observer, R, observer, running
from tests.helpers import reader, spawn_daemon, stop_daemon
from tests.lanes_rig import TIMINGS, lane_config, lane_toml

REPO = Path(__file__).resolve().parent.parent
# Long enough for a restart of the daemon as a process (the first car), short enough to wait out (the second).
PASS_TIMEOUT = 6.0


async def test_an_event_redelivered_after_a_restart_is_applied_once(tmp_path: Path) -> None:
    port = free_port()
    cfg = lane_config(tmp_path, port)
    clock = ManualClock(wall=1_800_000_000.0)
    # The controller resends an unacknowledged event only after 3 s: time enough for a restart in between.
    entry = BarrierSim(tmp_path / "ttyIN1", timings=Timings(**{**vars(TIMINGS), "event_resend": 3.0}))
    exit_ = BarrierSim(tmp_path / "ttyOUT1", timings=TIMINGS)
    await entry.start()
    await exit_.start()
    try:
        async with running(cfg, clock=clock), observer(port) as obs:
            await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
            entry.vehicle_arrives()
            await obs.pub("cameras/cam-in1/reads", {"event_id": "e1", "plate": "AB123CD"})
            await until(lambda: entry.barrier == BarrierState.OPEN)
            # Every event so far acknowledged (OPENED's ACK may still be on its way): the ACK lost is PASSED's.
            await until(lambda: not entry.unacked)
            entry.lose_host_acks(1)  # PASSED is committed, its ACK never reaches the controller
            await entry.vehicle_passes()
            (first,) = await obs.wait_for(lambda: obs.events("session.confirmed"))
        passed = next(e for e in entry.events if e.code == wire.PASSED)
        assert passed.acked_at is None
        async with running(cfg, clock=clock), observer(port) as obs:
            await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
            # The next car is waiting for its pass when the controller delivers the old PASSED again.
            await until(lambda: entry.barrier == BarrierState.CLOSED)
            entry.vehicle_arrives()
            await obs.pub("cameras/cam-in1/reads", {"event_id": "e2", "plate": "CD456EF"})
            (second,) = await obs.wait_for(lambda: obs.events("session.started"))
            await until(lambda: passed.acked_at is not None, timeout=10)
            await obs.request("availability", {"lot": "lot1"})
            assert obs.events("session.confirmed") == []  # the redelivery did not confirm the second car
            await until(lambda: entry.barrier == BarrierState.OPEN)
            await entry.vehicle_passes()
            (confirmed,) = await obs.wait_for(lambda: obs.events("session.confirmed"))
            assert confirmed["session_id"] == second["session_id"] != first["session_id"]
    finally:
        await entry.close()
        await exit_.close()
    conn = reader(cfg)
    try:
        assert audit(conn) == []
        states = dict(conn.execute("SELECT state, COUNT(*) FROM sessions GROUP BY state").fetchall())
        assert states == {"active": 2}
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def observer_when_up(port: int) -> AsyncIterator[Observer]:
    """An observer of the daemon's embedded broker, once the daemon says it is online."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with observer(port) as obs:
                await obs.wait_for(lambda: obs.state(f"{R}/status") == "online", timeout=30)
                yield obs
                return
        except aiomqtt.MqttError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _event(tmp: Path, type_: str) -> dict[str, Any] | None:
    conn = connect(db_path(tmp / "state"), readonly=True)
    try:
        row = conn.execute("SELECT body FROM outbox WHERE type = ? ORDER BY seq DESC LIMIT 1", (type_,)).fetchone()
    finally:
        conn.close()
    return None if row is None else dict(json.loads(row[0]))


def _cli(command: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", command, "--config", str(config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_kill_9_between_commit_and_open_then_restart(tmp_path: Path) -> None:
    """The window is hit on purpose: the controller's cable is out, so the entry is committed and its OPEN
    cannot go out. After `kill -9` and a restart the OPEN is sent (the car gets in); a second car whose restart
    comes after its pass timeout is cancelled instead, and its barrier never opens."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(lane_toml(tmp_path, port, pass_timeout=PASS_TIMEOUT))
    log = tmp_path / "daemon.log"
    entry = BarrierSim(tmp_path / "ttyIN1", timings=TIMINGS)
    exit_ = BarrierSim(tmp_path / "ttyOUT1", timings=TIMINGS)
    await entry.start()
    await exit_.start()
    proc = spawn_daemon(config, log)
    try:
        for car, plate in enumerate(("AB123CD", "CD456EF")):
            async with observer_when_up(port) as obs:
                await until(lambda: any(c.cmd == wire.DISPLAY for c in entry.commands), timeout=20)
                entry.unplug()
                entry.vehicle_arrives()
                await obs.pub("cameras/cam-in1/reads", {"event_id": f"e{car}", "plate": plate})
                (started,) = await obs.wait_for(lambda: obs.events("session.started"), timeout=20)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            opens = len([c for c in entry.commands if c.cmd == wire.OPEN])
            if car == 1:
                await asyncio.sleep(PASS_TIMEOUT + 0.5)  # past the pass timeout while the gateway is down
            entry.replug()
            proc = spawn_daemon(config, log)
            async with observer_when_up(port) as obs:
                if car == 0:
                    await until(lambda: entry.barrier == BarrierState.OPEN, timeout=20)
                    await entry.vehicle_passes()
                    (confirmed,) = await obs.wait_for(lambda: obs.events("session.confirmed"), timeout=20)
                    assert confirmed["session_id"] == started["session_id"]
                else:
                    # Cancelled at the start (maybe before this observer subscribed): the store and its outbox say so.
                    cancelled = await obs.wait_for(lambda: _event(tmp_path, "session.cancelled"), timeout=20)
                    assert cancelled == {**cancelled, "session_id": started["session_id"], "reason": "pass_timeout"}
                    await obs.request("availability", {"lot": "lot1"})
                    assert len([c for c in entry.commands if c.cmd == wire.OPEN]) == opens
                    entry.vehicle_backs_out()
                await until(lambda: not entry.loop_a and entry.barrier == BarrierState.CLOSED, timeout=10)
        stop_daemon(proc)
        result = _cli("audit", config)
        assert result.returncode == 0, result.stdout + result.stderr
        status = json.loads(_cli("status", config, "--json").stdout)
        gates = {g["gate"]: g for g in status["gates"]}
        assert gates["in1"]["opens_pending"] == 0 and gates["in1"]["entries_waiting"] == 0
        assert gates["in1"]["barrier"] in ("closed", "offline") and gates["in1"]["faults"] >= 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await entry.close()
        await exit_.close()
    assert "Traceback" not in log.read_text()
