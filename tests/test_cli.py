"""The command line as a user runs it: real processes, real files, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def site(tmp_path: Path, slots: str = "A-001..A-005") -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "{tmp_path / "state"}"\n'
        f"[broker]\nallow_anonymous = true\nport = {free_port()}\n"
        f'[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{{ ids = "{slots}" }}]\n'
    )
    return path


def test_check_config_ok_and_errors(tmp_path: Path) -> None:
    ok = cli("check-config", str(REPO / "config" / "gateway.example.toml"))
    assert ok.returncode == 0, ok.stderr
    demo = cli("check-config", str(REPO / "config" / "demo.toml"))
    assert demo.returncode == 0 and "120 slots" in demo.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nid = "GW 1"\ncolour = 1\n[broker]\nallow_anonymous = true\n'
        '[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{ ids = "A-9..A-1" }]\n'
    )
    res = cli("check-config", str(bad))
    assert res.returncode == 2
    assert "gateway.id" in res.stderr and "gateway.colour" in res.stderr
    assert "Traceback" not in res.stderr
    missing = cli("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_check_config_names_field_errors_and_cross_references_in_one_run(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nid = "gw1"\n[broker]\nallow_anonymous = true\nport = 0\n'
        '[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{ ids = "A-1..A-5" }, { ids = "A-3" }]\n'
        '[[lots.zones]]\nid = "B"\nslots = [{ ids = "B-1", type = "no spaces" }]\n'
        '[[gates]]\nid = "in1"\nlot = "lot9"\ndirection = "entry"\n'
    )
    res = cli("check-config", str(bad))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert any(line.startswith("config error: broker.port:") for line in lines), lines
    assert any(line.startswith("config error: lots[0].zones[1].slots[0].type:") for line in lines), lines
    assert "config error: gates[0].lot: unknown lot 'lot9'" in lines
    assert any(
        line.startswith("config error: lots[0].zones[0].slots[1].ids: duplicate slot id 'A-3'") for line in lines
    )
    assert len(lines) == 4 and "Traceback" not in res.stderr


def _run_daemon(config: Path) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        db = config.parent / "state" / "gateway.db"
        deadline = time.monotonic() + 20
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def test_run_creates_store_and_key_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = site(tmp_path)
    log = _run_daemon(config)
    # Not a terminal: every log line is a JSON object with a level and an event.
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert {"gateway started", "gateway stopping"} <= {line["event"] for line in lines}
    assert all("level" in line and "timestamp" in line for line in lines)
    key = tmp_path / "state" / "plate.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    res = cli("audit", "--config", str(config))
    assert res.returncode == 0, res.stdout
    status = cli("status", "--config", str(config))
    assert status.returncode == 0 and "5/5 available" in status.stdout


def test_audit_names_a_slot_corrupted_behind_the_writer(tmp_path: Path) -> None:
    config = site(tmp_path)
    _run_daemon(config)
    db = tmp_path / "state" / "gateway.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP INDEX sessions_one_per_slot")
    conn.execute("DROP INDEX sessions_one_per_vehicle")
    for sid, vehicle in (("s1", "v-a"), ("s2", "v-b")):
        conn.execute(
            "INSERT INTO sessions (id, lot, zone, slot, plate, vehicle, state, started_at)"
            " VALUES (?, 'lot1', 'A', 'A-003', 'X', ?, 'active', 0)",
            (sid, vehicle),
        )
    conn.close()
    res = cli("audit", "--config", str(config))
    assert res.returncode == 1
    assert "slot A-003: 2 active sessions" in res.stdout
    assert "fence index sessions_one_per_slot is missing" in res.stdout
    assert "slot A-003: status is 'available' but the store implies 'occupied'" in res.stdout


def test_status_without_store_is_a_clear_error(tmp_path: Path) -> None:
    res = cli("status", "--config", str(site(tmp_path)))
    assert res.returncode == 1 and "no store here" in res.stderr and "Traceback" not in res.stderr


def test_run_refuses_to_drop_an_occupied_slot(tmp_path: Path) -> None:
    config = site(tmp_path)
    _run_daemon(config)
    conn = sqlite3.connect(tmp_path / "state" / "gateway.db", isolation_level=None)
    conn.execute(
        "INSERT INTO sessions (id, lot, zone, slot, plate, vehicle, state, started_at)"
        " VALUES ('s1', 'lot1', 'A', 'A-005', 'X', 'v-x', 'active', 0)"
    )
    conn.close()
    smaller = site(tmp_path, "A-001..A-004")
    res = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(smaller)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 1
    assert "A-005" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("env_var", ["STATE_DIRECTORY"])
def test_state_directory_env_wins(tmp_path: Path, env_var: str) -> None:
    config = site(tmp_path)
    other = tmp_path / "systemd-state"
    env = {**os.environ, env_var: str(other)}
    res = cli("check-config", str(config), env=env)
    assert res.returncode == 0


def test_passwd_writes_a_users_file_the_broker_accepts(tmp_path: Path) -> None:
    users = tmp_path / "users"
    for user, pw in (("gateway", "gw-secret"), ("A-001", "s1"), ("A-001", "s1-new")):
        res = subprocess.run(
            [sys.executable, "-m", "gateway", "passwd", str(users), user, "--password-stdin"],
            input=pw + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    lines = users.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["gateway", "A-001"]
    from pwdlib.hashers.argon2 import Argon2Hasher

    assert Argon2Hasher().verify("s1-new", lines[1].split(":", 1)[1])
    gone = cli("passwd", str(users), "A-001", "--delete")
    assert gone.returncode == 0 and len(users.read_text().splitlines()) == 1
    bad = cli("passwd", str(users), "bad:name", "--delete")
    assert bad.returncode == 2 and "user name" in bad.stderr


@pytest.mark.parametrize("umask", [0o022, 0o000])
async def test_one_daemon_per_store_with_private_files(tmp_path: Path, umask: int) -> None:
    from tests.harness import R, observer

    config = site(tmp_path)
    port = int(next(line for line in config.read_text().splitlines() if line.startswith("port")).split("=")[1])
    acl = tmp_path / "anonymous.acl"  # the observer below requests as an anonymous client
    acl.write_text("topic readwrite #\n")
    config.write_text(config.read_text().replace("[broker]\n", f'[broker]\nacl_file = "{acl}"\n'))
    cmd = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
    pipe = asyncio.subprocess.PIPE
    first = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL, stderr=pipe, umask=umask)
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 20)
        async with observer(port) as obs:
            await obs.wait_for(lambda: obs.state(f"{R}/status") == "online", timeout=20)
            second = await asyncio.create_subprocess_exec(*cmd, stdout=pipe, stderr=pipe, umask=umask)
            _, raw = await asyncio.wait_for(second.communicate(), 30)
            lock, err = tmp_path / "state" / "gateway.lock", raw.decode()
            assert second.returncode == 1, err
            assert f"the lock {lock} is held" in err and "Traceback" not in err
            reply = await obs.request("enter", {"vehicle": "AB123CD", "lot": "lot1"})  # the first keeps serving
            assert reply["status"] == "ok"
            state = tmp_path / "state"
            assert stat.S_IMODE(state.stat().st_mode) == 0o700
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
            names = {"gateway.db", "gateway.db-wal", "gateway.db-shm", "plate.key", "gateway.lock"}
            assert modes == dict.fromkeys(names, 0o600)
    finally:
        first.send_signal(signal.SIGTERM)
        _, raw = await asyncio.wait_for(first.communicate(), 20)
    assert first.returncode == 0, raw.decode()


def test_the_daemon_loads_no_rich_off_a_terminal() -> None:
    # structlog's console renderer imports rich when it can (about 5 MiB resident): JSON lines never need it.
    code = (
        "import sys, gateway.app, gateway.cli, gateway.logs; gateway.logs.configure()\n"
        "print(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] == 'rich'))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
