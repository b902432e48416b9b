"""systemd's notify protocol (`Type=notify`, `WatchdogSec=`): READY once online, WATCHDOG while the writer moves.

Datagrams to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace) on a plain AF_UNIX socket, as
sd_notify(3) sends them; no dependency. Without `$NOTIFY_SOCKET` (not under systemd) the service does nothing.

- `READY=1` once the MQTT link is online (store open, every subscription granted, `online` published), so
  `systemctl start` returns when the gateway serves, and units ordered after it start then.
- `WATCHDOG=1` after each no-op `Ping` command has made a round trip through the writer, at half of
  `$WATCHDOG_USEC`. A writer stuck on a lock or a hung fsync stops the pings and systemd restarts the daemon,
  instead of leaving it `online` and deaf. A broker outage does not stop them: the link reconnects by itself.
- `STOPPING=1` when the daemon begins to stop (this service is the last to start, so the first to stop).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import structlog

from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.domain import Ping
from gateway.mqtt.link import MqttLink
from gateway.store.writer import Writer

log = structlog.get_logger("gateway.systemd")

ONLINE_POLL_S = 3600.0


def notify_address(value: str) -> str | None:
    """The socket address of a `$NOTIFY_SOCKET` value: `@` starts an abstract-namespace name."""
    if not value or value[0] not in "/@":
        return None  # systemd sends absolute paths or abstract names; vsock addresses are not for us
    return "\0" + value[1:] if value[0] == "@" else value


def watchdog_interval(environ: dict[str, str] | os._Environ[str]) -> float | None:
    """Half of `$WATCHDOG_USEC`, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Systemd:
    name = "systemd"

    def __init__(self, link: MqttLink, writer: Writer, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._link = link
        self._writer = writer
        self._clock = clock
        self._address = notify_address(os.environ.get("NOTIFY_SOCKET", ""))
        self.interval = watchdog_interval(os.environ) if self._address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False
        self.pings = 0
        self.ready = False

    async def start(self) -> None:
        if self._address is not None and self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    async def run(self) -> None:
        if self._sock is None:
            return
        while True:
            try:
                await self._link.wait_connected(ONLINE_POLL_S)
                break
            except TimeoutError:
                continue
        self.ready = True
        self.notify("READY=1\nSTATUS=online")
        if self.interval is None:
            return
        while True:
            started = self._clock.monotonic()
            await self._writer.submit(Ping())  # waits as long as the writer is stuck: no WATCHDOG=1 then
            self.pings += 1
            self.notify("WATCHDOG=1")
            await self._clock.sleep(max(0.0, self.interval - (self._clock.monotonic() - started)))

    async def stop(self) -> None:
        if self._sock is not None:
            self.notify("STOPPING=1")
            self._sock.close()
            self._sock = None

    async def health(self) -> dict[str, Any]:
        return {"notify": self._sock is not None, "watchdog_s": self.interval, "pings": self.pings}

    def notify(self, message: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._warned:  # systemd gone or the socket full: keep serving, say it once
                self._warned = True
                log.warning("systemd notify failed", error=str(exc), message=message.split("\n", 1)[0])
