"""Edge fitness of the daemon: time to `online`, idle CPU, and what heartbeats that change nothing cost.

Run: `.venv/bin/python -m bench.edge` (about five minutes here), `--quick` for a smoke check. See bench/README.md,
section Edge.

Per size, a fresh store and its own `python -m gateway run` toward one Mosquitto subprocess (as bench/ingest.py
starts them). Measured: the seconds from spawning the process to the retained `online` (a cold start on an empty
store, and a restart on the same store); CPU over `--idle` seconds with no input after every sensor reported
once; then `--heartbeat` seconds of every sensor re-reporting its unchanged state once a minute (the JSON
driver's cadence): its CPU, the commits the store saw (SQLite's `data_version`, read by a connection of our own)
and the bytes the process caused to be written to storage (`write_bytes` of /proc/<pid>/io). The targets of the
edge (a Pi without a fan, on an SD card): online within 3 s, idle CPU <= 1 %, no disk write for a heartbeat that
changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.ingest import Daemon, Mosquitto, cpu_seconds, mqtt_client, sensor_ids, wait_states
from simulators import rfc3339

DEFAULT_SLOTS = (1_000, 10_000)
HEARTBEAT_EVERY = 60.0  # the JSON sensors' cadence (bench/accuracy.py's world)


def _io(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


async def _report_all(port: int, sensors: list[str], seconds: float, seq: int) -> int:
    """Every sensor reports `vacant` once, spread evenly over `seconds` (0: at once); returns the next seq."""
    ts = rfc3339(time.time())
    ticks = max(1, int(seconds * 10))
    per_tick = -(-len(sensors) // ticks)
    start = time.monotonic()
    async with mqtt_client(port, f"bench-edge-{uuid.uuid4().hex[:6]}") as client:
        for tick in range(ticks):
            for sensor in sensors[tick * per_tick : (tick + 1) * per_tick]:
                doc = {"occupied": False, "ts": ts, "seq": seq, "battery": 3.6}
                await client.publish(f"sensors/{sensor}/state", json.dumps(doc).encode(), qos=1)
            if seconds:
                await asyncio.sleep(max(0.0, start + (tick + 1) * 0.1 - time.monotonic()))
    return seq + 1


async def _online(root: Path, port: int, slots: int) -> tuple[Daemon, float]:
    start = time.monotonic()
    daemon = Daemon(root, port, embedded=False, slots=slots, profile=None)
    await daemon.wait_online(timeout=120)
    return daemon, time.monotonic() - start


async def measure(root: Path, port: int, *, slots: int, idle: float, heartbeat: float) -> dict[str, Any]:
    sensors = sensor_ids(slots)
    work = root / f"edge-{slots}"
    daemon, cold = await _online(work, port, slots)
    try:
        seq = await _report_all(port, sensors, 0, 1)  # each sensor known: vacant
        with contextlib.closing(sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True)) as conn:
            await wait_states(conn, dict.fromkeys(sensors, "vacant"), timeout=120)
        await asyncio.sleep(3.0)
        cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        await asyncio.sleep(idle)
        idle_cpu = (cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)

        reader = sqlite3.connect(f"file:{daemon.db}?mode=ro", uri=True)
        try:
            version0, io0 = _data_version(reader), _io(daemon.pid)
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            rounds = max(1, round(heartbeat / HEARTBEAT_EVERY))
            for _ in range(rounds):
                seq = await _report_all(port, sensors, heartbeat / rounds, seq)
            await asyncio.sleep(1.0)
            beat_cpu = (cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
            commits = _data_version(reader) - version0
            written = _io(daemon.pid)["write_bytes"] - io0["write_bytes"]
        finally:
            reader.close()
        messages = rounds * len(sensors)
    finally:
        daemon.stop()
    daemon, warm = await _online(work, port, slots)
    daemon.stop()
    return {
        "slots": slots,
        "online_cold_s": cold,
        "online_restart_s": warm,
        "idle_s": idle,
        "idle_cpu": idle_cpu,
        "heartbeat_s": heartbeat,
        "heartbeats": messages,
        "heartbeat_cpu": beat_cpu,
        "heartbeat_commits": commits,
        "heartbeat_write_bytes": written,
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| slots | online, cold (s) | online, restart (s) | idle CPU | heartbeats | their CPU | commits "
        "| bytes written |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['slots']:,} | {r['online_cold_s']:.2f} | {r['online_restart_s']:.2f} | {100 * r['idle_cpu']:.2f} % "
            f"| {r['heartbeats']:,} in {r['heartbeat_s']:.0f} s | {100 * r['heartbeat_cpu']:.2f} % "
            f"| {r['heartbeat_commits']} | {r['heartbeat_write_bytes']:,} |"
        )
    return "\n".join(out)


async def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    broker = Mosquitto(root)
    try:
        rows = []
        for slots in args.slots:
            print(f"... {slots:,} slots", file=sys.stderr, flush=True)
            rows.append(await measure(root, broker.port, slots=slots, idle=args.idle, heartbeat=args.heartbeat))
        return rows
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--slots",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(DEFAULT_SLOTS),
        help="comma-separated sizes (1000,10000)",
    )
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measured (60)")
    ap.add_argument("--heartbeat", type=float, default=60.0, help="seconds of unchanged heartbeats (60)")
    ap.add_argument("--quick", action="store_true", help="1,000 slots, 10 s windows")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.slots, args.idle, args.heartbeat = [1_000], 10.0, 10.0
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print(f"load average after: {os.getloadavg()[0]:.2f}; python {platform.python_version()}", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
