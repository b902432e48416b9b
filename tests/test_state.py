"""Guarantee 7: one daemon per store, private files whatever the umask, a plate key made once."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from gateway.core.plates import PlateError, PlateKey

PROCESSES = 30
THREADS = 10  # 300 concurrent first starts, in each of ROUNDS fresh directories
ROUNDS = 10


def _start(tmp: Path, barrier: Barrier, out: Queue[list[tuple[int, str]]]) -> None:
    results: list[tuple[int, str]] = []

    def one() -> None:
        for r in range(ROUNDS):
            barrier.wait()  # every thread of every process, released together
            try:
                results.append((r, PlateKey.load_or_create(tmp / str(r) / "plate.key").token("AB123CD")))
            except Exception as exc:
                results.append((r, f"failed: {exc!r}"))

    threads = [threading.Thread(target=one) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


def test_300_concurrent_first_starts_get_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(PROCESSES * THREADS)
    out: Queue[list[tuple[int, str]]] = ctx.Queue()
    procs = [ctx.Process(target=_start, args=(tmp_path, barrier, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    results = [item for _ in procs for item in out.get(timeout=60)]
    for p in procs:
        p.join(10)
    failed = [t for _, t in results if t.startswith("failed")]
    assert not failed, f"{len(failed)} of {len(results)} starts failed, e.g. {failed[0]}"
    for r in range(ROUNDS):
        assert len({t for rr, t in results if rr == r}) == 1  # one key per directory, whoever made it
        path = tmp_path / str(r) / "plate.key"
        assert len(path.read_bytes()) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["plate.key"]  # no temporary file left
    assert len(results) == PROCESSES * THREADS * ROUNDS


def test_an_empty_plate_key_is_replaced_and_a_short_one_named(tmp_path: Path) -> None:
    path = tmp_path / "plate.key"
    path.write_bytes(b"")  # an older release crashed between create and write
    first = PlateKey.load_or_create(path).token("AB123CD")
    assert len(path.read_bytes()) == 32
    assert PlateKey.load_or_create(path).token("AB123CD") == first
    path.write_bytes(b"short")
    with pytest.raises(PlateError, match=str(path)):
        PlateKey.load_or_create(path)


def test_the_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        PlateKey.load_or_create(tmp_path / "plate.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plate.key").stat().st_mode) == 0o600
