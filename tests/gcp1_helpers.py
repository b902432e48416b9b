"""Shared by the GCP/1 link and barrier simulator tests: waiting, a raw pty host, and an fd leak check."""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from drivers.gcp1.frames import Frame, FrameParser


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds; fail the test (not hang) after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


class RawHost:
    """The host end of a pty opened as a plain raw tty: bytes in, frames out (parsed by the driver's codec)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        self.parser = FrameParser()
        self.frames: list[Frame] = []
        self.hung_up = False
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except OSError:
            data = b""
        if not data:  # the controller's end is gone
            self.hung_up = True
            asyncio.get_running_loop().remove_reader(self.fd)
            return
        self.frames += self.parser.feed(data)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def of(self, cmd: int) -> list[Frame]:
        return [f for f in self.frames if f.cmd == cmd]

    def close(self) -> None:
        if not self.hung_up:
            asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
async def no_leaks() -> AsyncIterator[None]:
    """Fails a test that leaves a file descriptor open (ptys, serial ports); conftest checks tasks and threads."""
    before = _fds()
    yield
    try:
        await until(lambda: not _fds() - before, timeout=2.0)
    except AssertionError:
        raise AssertionError(f"file descriptors left open: {sorted(_fds() - before)}") from None
