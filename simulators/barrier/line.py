"""The cable: a pseudo-terminal pair whose slave is reachable at a fixed path (a symlink the gateway's config names).

`unplug()` closes the pair, as a pulled USB adapter does: the host's reads fail and the path vanishes.
`replug()` makes a new pair and re-points the symlink, so the host finds its port again at the same path.
"""

from __future__ import annotations

import asyncio
import os
import tty
from collections.abc import Callable
from pathlib import Path


class PtyLine:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.listeners: list[Callable[[bytes], None]] = []  # every controller on the line hears every byte
        self.written = 0
        self.lost_writes = 0  # bytes the line could not take (unplugged, or nobody reading and the buffer full)
        self._master: int | None = None
        self._slave: int | None = None

    @property
    def plugged(self) -> bool:
        return self._master is not None

    @property
    def device(self) -> str | None:
        """The `/dev/pts/N` the path points at while plugged."""
        return None if self._slave is None else os.ttyname(self._slave)

    def plug(self) -> None:
        if self._master is not None:
            return
        master, slave = os.openpty()
        # Raw before any byte moves: a cooked pty echoes and translates. The simulator keeps the slave open too,
        # so that the master does not read EIO while the host has its end closed (between reopen attempts).
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.path)
        asyncio.get_running_loop().add_reader(master, self._readable)

    def unplug(self) -> None:
        if self._master is None:
            return
        asyncio.get_running_loop().remove_reader(self._master)
        os.close(self._master)
        if self._slave is not None:
            os.close(self._slave)
        self._master = self._slave = None
        self.path.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        if self._master is None:
            self.lost_writes += len(data)
            return
        try:
            n = os.write(self._master, data)
        except OSError:  # BlockingIOError: the slave's input buffer is full
            n = 0
        self.written += n
        self.lost_writes += len(data) - n

    def _readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except OSError:
            return
        for listener in self.listeners:
            listener(data)
