"""Shared fixtures: real brokers on free ports, never the machine's own Mosquitto; no test leaves anything behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LINGER_GRACE_S = 2.0


def _child_processes() -> set[int]:
    """Live (not zombie) children of this process."""
    me = str(os.getpid())
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if ppid == me and state != "Z":
            out.add(int(entry))
    return out


def _leftovers(threads: set[threading.Thread], children: set[int]) -> list[str]:
    # asyncio_N: the loop's default executor, joined by no_lingering_tasks and when the loop closes.
    found = [
        f"thread {t.name}"
        for t in threading.enumerate()
        if t not in threads and t.is_alive() and not t.name.startswith("asyncio_")
    ]
    found += [f"child process {pid}" for pid in _child_processes() - children]
    return found


@pytest.fixture(autouse=True)
def verify_no_lingering(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind (aioesphomeapi's verify_no_lingering_tasks).

    Tasks are checked by `no_lingering_tasks` below for every async test.
    """
    threads = set(threading.enumerate())
    children = _child_processes()
    yield
    deadline = time.monotonic() + LINGER_GRACE_S
    while (left := _leftovers(threads, children)) and time.monotonic() < deadline:
        time.sleep(0.05)  # executor threads and killed children need a moment to go
    if left:
        pytest.fail(f"{request.node.nodeid} left behind: {', '.join(left)}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if asyncio.iscoroutinefunction(getattr(item, "obj", None)) and isinstance(item, pytest.Function):
            item.fixturenames.insert(0, "no_lingering_tasks")  # set up first, checked after every other fixture


@pytest.fixture
async def no_lingering_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail an async test that leaves tasks running in its event loop (added to every async test)."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    deadline = time.monotonic() + LINGER_GRACE_S
    while True:
        left = [t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()]
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    problems = sorted(f"task {t.get_name()}" for t in left)
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=LINGER_GRACE_S)
    try:
        # A job still running in the default executor (paho connects there) is left behind too.
        await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), LINGER_GRACE_S)
    except TimeoutError:
        problems.append("a job in the loop's default executor")
    if problems:
        pytest.fail(f"{request.node.nodeid} left behind: {', '.join(problems)}")


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class MosquittoProcess:
    """A mosquitto subprocess on a free port; stop()/start() keep the port (broker restart tests).

    `tls` = (CA, certificate, key) files make the listener TLS.
    """

    def __init__(self, workdir: Path, extra_conf: str = "", tls: tuple[Path, Path, Path] | None = None) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        if tls is not None:
            # Run as root, mosquitto reads the files after dropping to its own user, who may not read them.
            extra_conf = f"cafile {tls[0]}\ncertfile {tls[1]}\nkeyfile {tls[2]}\nuser root\n{extra_conf}"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 100000\n"
            f"{extra_conf}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --- the bundled amqtt broker, in the test's own event loop (imports here leave the block above as it was)
from gateway.mqtt.broker import BrokerOptions, EmbeddedBroker  # noqa: E402


class AmqttBroker:
    """An in-process amqtt broker (anonymous allowed) on a free port; stop()/start() keep the port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._broker: EmbeddedBroker | None = None

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port)

    async def start(self) -> None:
        self._broker = EmbeddedBroker(BrokerOptions(port=self.port, allow_anonymous=True))
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.stop()
            self._broker = None


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[AmqttBroker]:
    broker = AmqttBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
