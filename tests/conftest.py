"""Shared fixtures: real brokers on free ports, never the machine's own Mosquitto."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


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
    """A mosquitto subprocess on a free port; stop()/start() keep the port (broker restart tests)."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (.ci/run installs it)")
        self.exe = exe
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
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
from collections.abc import AsyncIterator  # noqa: E402

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
