"""Idle memory of the daemon: VmRSS after it settles, and VmHWM, by number of slots.

Run: `.venv/bin/python -m bench.memory` (about a minute here), `--slots 100,10000` to choose sizes. See
bench/README.md, section Memory.

Each size gets a fresh store and its own `python -m gateway run` process toward one Mosquitto subprocess
(MQTT 5, the default), started like bench/ingest.py starts it. Once the daemon has announced `online` it is
left alone for `--settle` seconds (its first health publish and housekeeping have run by then), and VmRSS is
sampled every second for `--samples` seconds: the table shows the last sample and the range, and VmHWM (the
peak, start-up included). `--restart` adds a second start on each store (what a Pi does after a reboot),
`--embedded` rows with the bundled broker in the daemon's process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.ingest import Daemon, Mosquitto, free_port

DEFAULT_SLOTS = (100, 10_000, 100_000)


async def measure(
    root: Path, port: int, *, slots: int, embedded: bool, settle: float, samples: int, restart: bool = False
) -> dict[str, Any]:
    tag = f"{'embedded' if embedded else 'mosquitto'}-{slots}"
    daemon = Daemon(root / tag, port, embedded=embedded, slots=slots, profile=None)  # restart: the same store
    try:
        await daemon.wait_online(timeout=300)
        await asyncio.sleep(settle)
        rss: list[int] = []
        for _ in range(samples):
            rss.append(daemon.memory()["VmRSS"])
            await asyncio.sleep(1.0)
        hwm = daemon.memory()["VmHWM"]
    finally:
        daemon.stop()
    broker = ("embedded" if embedded else "mosquitto") + (", restart" if restart else "")
    return {"broker": broker, "slots": slots, "rss_kib": rss, "hwm_kib": hwm}


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| broker | slots | VmRSS idle (MiB) | range over the samples | VmHWM (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        rss = row["rss_kib"]
        out.append(
            f"| {row['broker']} | {row['slots']:,} | {_mib(rss[-1])} | {_mib(min(rss))}..{_mib(max(rss))} "
            f"| {_mib(row['hwm_kib'])} |"
        )
    return "\n".join(out)


async def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    broker = Mosquitto(root)
    try:
        for slots in args.slots:
            for restart in (False, True) if args.restart else (False,):
                print(f"... mosquitto, {slots:,} slots{', restart' if restart else ''}", file=sys.stderr, flush=True)
                rows.append(
                    await measure(
                        root,
                        broker.port,
                        slots=slots,
                        embedded=False,
                        settle=args.settle,
                        samples=args.samples,
                        restart=restart,
                    )
                )
    finally:
        broker.stop()
    if args.embedded:
        for slots in args.slots:
            print(f"... embedded, {slots:,} slots", file=sys.stderr, flush=True)
            rows.append(
                await measure(root, free_port(), slots=slots, embedded=True, settle=args.settle, samples=args.samples)
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--slots",
        type=lambda text: [int(part) for part in text.split(",")],
        default=list(DEFAULT_SLOTS),
        help="comma-separated sizes (100,10000,100000)",
    )
    ap.add_argument("--settle", type=float, default=10.0, help="seconds idle after online before sampling (10)")
    ap.add_argument("--samples", type=int, default=5, help="VmRSS samples, one a second (5)")
    ap.add_argument("--embedded", action="store_true", help="also with the bundled broker")
    ap.add_argument("--restart", action="store_true", help="also a second start on each store (Mosquitto)")
    ap.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print(f"load average after: {os.getloadavg()[0]:.2f}; python {platform.python_version()}", file=sys.stderr)
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
