"""nats-server processes with JetStream and the MQTT listener, on free loopback ports (never 4222)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port


def nats_exe() -> str:
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(exe).exists():
        pytest.skip("nats-server is not installed (.ci/run installs the Debian package)")
    return exe


class NatsNode:
    """One nats-server; `routes` (cluster ports of every node) makes it a member of a cluster."""

    def __init__(self, workdir: Path, name: str, *, cluster_port: int = 0, routes: tuple[int, ...] = ()) -> None:
        self.exe = nats_exe()
        self.name = name
        self.client_port = free_port()
        self.mqtt_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / f"{name}.conf"
        self.log = workdir / f"{name}.log"
        cluster = ""
        if routes:
            listed = ", ".join(f"nats://127.0.0.1:{p}" for p in routes)
            cluster = f"cluster {{\n  name: upstream\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{listed}]\n}}\n"
        self.conf.write_text(
            f"server_name: {name}\n"
            f"listen: 127.0.0.1:{self.client_port}\n"
            f'jetstream {{ store_dir: "{workdir / (name + "-js")}" }}\n'
            f"{cluster}"
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port} }}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def mqtt(self) -> tuple[str, int]:
        return ("127.0.0.1", self.mqtt_port)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.mqtt_port, timeout=20)

    def kill(self) -> None:
        """SIGKILL: the node dies mid-stream, as on a power cut."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def cluster(workdir: Path, size: int = 3) -> list[NatsNode]:
    """`size` JetStream nodes routed to each other (not started)."""
    ports = tuple(free_port() for _ in range(size))
    return [NatsNode(workdir, f"n{i + 1}", cluster_port=ports[i], routes=ports) for i in range(size)]
