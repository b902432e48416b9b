"""systemd's notify protocol against the real daemon: READY once online, WATCHDOG only while the writer moves."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import sys
import uuid
from pathlib import Path

from gateway.services.systemd import notify_address, watchdog_interval
from tests.conftest import free_port, wait_for_port
from tests.harness import R, observer

WATCHDOG_USEC = 600_000  # a ping every 0.3 s


def _config(tmp_path: Path, port: int) -> Path:
    path, acl = tmp_path / "gw.toml", tmp_path / "anonymous.acl"
    acl.write_text("topic readwrite #\n")
    path.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[broker]\nallow_anonymous = true\nport = {port}\nacl_file = "{acl}"\n'
        '[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{ ids = "A-001..A-005" }]\n'
    )
    return path


class Notifications:
    """The datagrams a notify socket the test binds receives, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: list[str] = []

    async def until(self, line: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while line not in self.lines:
                data = await asyncio.get_running_loop().sock_recv(self.sock, 4096)
                self.lines.extend(data.decode().split("\n"))

    async def drain(self, seconds: float) -> list[str]:
        """What arrives within `seconds`."""
        got: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), left)
            except TimeoutError:
                break
            got.extend(data.decode().split("\n"))
        self.lines.extend(got)
        return got


async def test_ready_after_online_watchdog_while_the_writer_moves_stopping_on_sigterm(tmp_path: Path) -> None:
    name = f"pg-test-{uuid.uuid4().hex[:12]}"  # the abstract namespace, as systemd may hand out
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    cmd = [sys.executable, "-m", "gateway", "run", "--config", str(_config(tmp_path, port))]
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    notes = Notifications(sock)
    try:
        await notes.until("READY=1")
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 5)
        async with observer(port) as obs:  # READY came once online: the retained status says so already
            await obs.wait_for(lambda: obs.state(f"{R}/status") is not None, timeout=5)
            assert obs.state(f"{R}/status") == "online"
        assert (await notes.drain(1.0)).count("WATCHDOG=1") >= 2  # healthy: pinging
        blocker = sqlite3.connect(tmp_path / "state" / "gateway.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer's Ping cannot commit now
        try:
            await notes.drain(0.5)  # a ping already past the writer may still arrive
            assert "WATCHDOG=1" not in await notes.drain(2.0)  # stuck: systemd would restart it
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert "WATCHDOG=1" in await notes.drain(1.5)  # the store is back: so are the pings
        proc.send_signal(signal.SIGTERM)
        await notes.until("STOPPING=1")
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
    assert notes.lines.index("READY=1") < notes.lines.index("STOPPING=1")


def test_notify_addresses_and_watchdog_interval() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract") == "\0abstract"
    assert notify_address("") is None and notify_address("vsock:2:1") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "0"}) is None
