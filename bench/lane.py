"""Lane latency: a camera read published over MQTT -> the OPEN frame on the barrier's pty, idle and under sensor load.

Run: `.venv/bin/python -m bench.lane` (about four minutes here), `--quick` for a smoke check. See bench/README.md,
section Lane.

One mosquitto subprocess (set_tcp_nodelay). The daemon (`python -m gateway run`, its own process, real store on
disk, toward that broker) has one entry gate whose GCP/1 controller is a `simulators.barrier.BarrierSim` on a
pty pair in this process. The baseline, in the same run: a bare aiomqtt subscriber process that writes a GCP/1
OPEN frame (drivers.gcp1 framing) to a pty of its own for every message: MQTT in -> serial frame out, no decision.
Both hops are timed in this process with `time.perf_counter_ns`: before the publish, and when the pty read that
completes the OPEN frame returns. Background load: another process publishing sensor reports at a fixed rate to
the same broker, for sensors of the daemon's lot (so the daemon debounces and commits them while it decides).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.ingest import (
    NODELAY,
    REPO,
    Mosquitto,
    _terminate,
    beside_mosquitto,
    cpu_seconds,
    mqtt_client,
    wait_for_port,
    write_json,
)
from drivers.gcp1 import Open, encode
from gateway.store.schema import connect, db_path
from simulators import rfc3339
from simulators.barrier import BarrierSim, BarrierState, PtyLine, Timings, wire

GATEWAY_ID = "gw1"
R = f"parking/{GATEWAY_ID}"
CAMERA_TOPIC = "cameras/cam-in1/reads"
RAW_TOPIC = "bench/raw/reads"  # matches none of the daemon's subscriptions
# Fast barrier motion so that an entry takes tens of ms; STATUS once a second as a real controller sends it.
TIMINGS = Timings(opening=0.01, closing=0.01, hold=0.02, dwell=0.005, status_interval=1.0, event_resend=0.5)
POLL = 0.002
STEP_TIMEOUT = 10.0


def site_toml(state_dir: Path, port: int, tty_path: Path, *, sensors: int, spare: int) -> str:
    """Zone A: `sensors` slots whose sensors the load reports on; zone B: `spare` slots whose sensors stay silent,
    so that the lot never fills with one session per entry (the cars never leave)."""
    return f"""
[gateway]
id = "{GATEWAY_ID}"
state_dir = "{state_dir}"
[broker]
embedded = false
host = "127.0.0.1"
port = {port}
[timing]
debounce = 0.05
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "S-{1:05d}..S-{sensors:05d}" }}]
  [[lots.zones]]
  id = "B"
  slots = [{{ ids = "P-{1:05d}..P-{spare:05d}" }}]
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
camera = "cam-in1"
serial = {{ port = "{tty_path}", address = 1 }}
[[tariffs]]
lot = "lot1"
currency = "EUR"
per_hour = 250
"""


class Daemon:
    """`python -m gateway run` in its own process; its log goes to a file in the work directory."""

    def __init__(
        self, workdir: Path, port: int, tty_path: Path, *, sensors: int, spare: int, profile: Path | None
    ) -> None:
        self.port = port
        config = workdir / "gateway.toml"
        config.write_text(site_toml(workdir / "state", port, tty_path, sensors=sensors, spare=spare))
        self.log_path = workdir / "gateway.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        prof = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "gateway", "run", "--config", str(config)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    async def wait_online(self, timeout: float = 60.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                async with mqtt_client(self.port, f"bench-status-{uuid.uuid4().hex[:6]}") as client:
                    await client.subscribe(f"{R}/status", qos=1)
                    async for message in client.messages:
                        if message.payload == b"online":
                            return
        except TimeoutError:
            raise SystemExit(f"the gateway did not come online; its log ends:\n{self.log_tail()}") from None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        _terminate(self.proc, timeout=60.0)  # a profiled daemon writes its stats on the way out
        self._log.close()


class OpenStamps:
    """Timestamps OPEN frames on a pty line: the perf_counter_ns of the read that completed each frame.

    A listener first in line stamps every read; one after the frame's consumer (the simulator, or our own
    deframer for the baseline) resolves the waiting future when that read completed an OPEN.
    """

    def __init__(self, line: PtyLine, completed_open: Callable[[bytes], bool]) -> None:
        self._chunk_ns = 0
        self._completed_open = completed_open
        self._waiter: asyncio.Future[int] | None = None
        line.listeners.insert(0, self._stamp)
        line.listeners.append(self._check)

    def expect(self) -> asyncio.Future[int]:
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def _stamp(self, _data: bytes) -> None:
        self._chunk_ns = time.perf_counter_ns()

    def _check(self, data: bytes) -> None:
        if self._completed_open(data) and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._chunk_ns)


def sim_opens(sim: BarrierSim) -> Callable[[bytes], bool]:
    """True when the simulator received a new OPEN since the last call (it parses before we look)."""
    seen = len(sim.received)

    def check(_data: bytes) -> bool:
        nonlocal seen
        new = sim.received[seen:]
        seen = len(sim.received)
        return any(c.cmd == wire.OPEN for c in new)

    return check


def raw_opens() -> Callable[[bytes], bool]:
    deframer = wire.Deframer()
    return lambda data: any(f.cmd == wire.OPEN for f in deframer.push(data))


async def until(check: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(POLL)


def displays(sim: BarrierSim) -> int:
    return sum(1 for c in sim.commands if c.cmd == wire.DISPLAY)


class Plates:
    """A fresh plate for every entry of the run."""

    def __init__(self) -> None:
        self._n = 0
        self._tag = uuid.uuid4().hex[:3].upper()

    def next(self) -> str:
        self._n += 1
        return f"B{self._tag}{self._n:06d}"


def read_payload(plate: str) -> bytes:
    return json.dumps({"event_id": uuid.uuid4().hex, "plate": plate, "ts": rfc3339(time.time())}).encode()


async def gateway_entry(
    client: aiomqtt.Client, sim: BarrierSim, stamps: OpenStamps, plate: str, read_delay: float
) -> int:
    """One car: onto loop A (ARRIVED acknowledged), `read_delay` later the read published, OPEN on the pty
    (timed), DISPLAY, the car passes (PASSED committed: the session is confirmed), the barrier closed again.
    Nanoseconds publish -> OPEN."""
    sim.vehicle_arrives()
    await until(lambda: not sim.unacked, "ARRIVED acknowledged")
    if read_delay:
        await asyncio.sleep(read_delay)  # the camera recognising the plate of the car it was triggered for
    shown = displays(sim)
    payload = read_payload(plate)
    opened = stamps.expect()
    t0 = time.perf_counter_ns()
    await client.publish(CAMERA_TOPIC, payload, qos=1)
    t1 = await asyncio.wait_for(opened, STEP_TIMEOUT)
    await until(lambda: sim.barrier == BarrierState.OPEN and displays(sim) > shown, "barrier open, slot shown")
    await sim.vehicle_passes()
    await until(lambda: not sim.unacked and sim.barrier == BarrierState.CLOSED, "PASSED acknowledged, closed")
    return t1 - t0


async def raw_entry(client: aiomqtt.Client, stamps: OpenStamps, plate: str) -> int:
    payload = read_payload(plate)
    opened = stamps.expect()
    t0 = time.perf_counter_ns()
    await client.publish(RAW_TOPIC, payload, qos=1)
    t1 = await asyncio.wait_for(opened, STEP_TIMEOUT)
    await asyncio.sleep(0.01)  # a pause between cars, as the gateway path has one
    return t1 - t0


# --- child processes


async def raw_hop(port: int, tty_path: str) -> None:
    """Child: subscribe to RAW_TOPIC, and for each message parse it and write a GCP/1 OPEN frame to the pty."""
    fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, lambda: os.read(fd, 4096))  # nothing answers, but keep the line drained
    seq = 0
    async with mqtt_client(port, f"bench-rawhop-{os.getpid()}", v5=True) as client:
        await client.subscribe(RAW_TOPIC, qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            json.loads(message.payload)
            seq = seq % 255 + 1
            os.write(fd, encode(1, seq, Open(0)))


def load_publisher(port: int, rate: int, sensors: int, tick_us: int) -> None:
    """Child: sensor reports at `rate` msgs/s (QoS 1, 64 in flight) until SIGTERM; then its stats as JSON.

    Round robin over the sensors; a sensor changes state every 5 of its reports (20 % transitions, as in
    bench/ingest.py), far beyond the daemon's 0.05 s debounce at this rate. paho directly, its network loop in
    a thread: the load should cost the shared machine as little as possible besides what it costs the daemon.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ids = [f"S-{i:05d}" for i in range(1, sensors + 1)]
    tick = tick_us / 1e6
    per_tick = max(1, round(rate * tick))
    sent = 0
    late = 0.0
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-load-{os.getpid()}")
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)  # no bound: the pace is ours
    client.connect("127.0.0.1", port, keepalive=30)
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    sock.setsockopt(*NODELAY)
    client.loop_start()
    print("ready", flush=True)
    start = time.monotonic()
    cpu0 = time.process_time()
    while not stop.is_set():
        ts = rfc3339(time.time())
        for _ in range(per_tick):
            r, j = divmod(sent, sensors)
            occupied = ((r + j) // 5) % 2 == 1
            doc = {"occupied": occupied, "ts": ts, "seq": r + 1, "battery": 3.6}
            client.publish(f"sensors/{ids[j]}/state", json.dumps(doc).encode(), qos=1)
            sent += 1
        wait = start + sent / (per_tick / tick) - time.monotonic()
        if wait > 0:
            stop.wait(wait)
        else:
            late = max(late, -wait)
    seconds = time.monotonic() - start
    cpu = time.process_time() - cpu0
    client.loop_stop()
    client.disconnect()
    doc = {"sent": sent, "seconds": seconds, "rate": sent / seconds, "max_behind_s": late, "cpu": cpu / seconds}
    print(json.dumps(doc), flush=True)


async def child(args: list[str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.lane", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        line = await proc.stdout.readline()
    if line.strip() != b"ready":
        raise SystemExit(f"child {args[0]} failed to start: {line!r}")
    return proc


async def end_child(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# --- the run


def pct(values: list[int], q: float) -> float:
    """Nearest-rank percentile, in ms."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] / 1e6


@dataclass(frozen=True, slots=True)
class Row:
    path: str  # gateway | raw
    load: str  # idle | load
    entries: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def row(path: str, load: str, ns: list[int]) -> Row:
    return Row(path, load, len(ns), pct(ns, 50), pct(ns, 99), max(ns) / 1e6, sum(ns) / len(ns) / 1e6)


@dataclass(frozen=True, slots=True)
class Options:
    entries: int
    block: int
    warmup: int
    rate: int
    sensors: int
    tick: float
    profile: Path | None
    read_delay: float


def quiet_heap() -> None:
    """Between blocks: a full collection now, and what survives it frozen, so that the bench's own collector (the
    simulator keeps every frame it saw) does not stall its loop inside a measured block, on either path."""
    gc.collect()
    gc.freeze()


async def run(opts: Options, root: Path, broker: Mosquitto) -> dict[str, Any]:
    await wait_for_port(broker.port)
    plates = Plates()
    sim = BarrierSim(root / "ttyIN1", timings=TIMINGS)
    raw_line = PtyLine(root / "ttyRAW")
    await sim.start()
    raw_line.plug()
    gw_stamps = OpenStamps(sim.line, sim_opens(sim))
    raw_stamps = OpenStamps(raw_line, raw_opens())
    spare = 2 * (opts.entries + opts.warmup) + 200
    daemon = Daemon(root, broker.port, root / "ttyIN1", sensors=opts.sensors, spare=spare, profile=opts.profile)
    hop: asyncio.subprocess.Process | None = None
    loader: asyncio.subprocess.Process | None = None
    out: dict[str, Any] = {}
    try:
        await daemon.wait_online()
        hop = await child(["--raw-hop", str(broker.port), str(root / "ttyRAW")])
        async with mqtt_client(broker.port, f"bench-cam-{uuid.uuid4().hex[:6]}") as client:
            await until(lambda: sim.commands != [], "the lane to talk to the controller", 30)
            for _ in range(opts.warmup):
                await gateway_entry(client, sim, gw_stamps, plates.next(), opts.read_delay)
                await raw_entry(client, raw_stamps, plates.next())
            rows: list[Row] = []
            for load in ("idle", "load"):
                if load == "load":
                    load_args = [str(broker.port), str(opts.rate), str(opts.sensors), str(round(opts.tick * 1e6))]
                    loader = await child(["--load-publisher", *load_args])
                    await asyncio.sleep(2.0)  # the daemon settles into the load
                cpu0 = cpu_seconds(daemon.proc.pid)
                t0 = time.monotonic()
                got: dict[str, list[int]] = {"gateway": [], "raw": []}
                # Interleaved blocks: a drift of the shared machine's load hits both paths alike.
                while len(got["gateway"]) < opts.entries:
                    quiet_heap()
                    n = min(opts.block, opts.entries - len(got["gateway"]))
                    for _ in range(n):
                        got["raw"].append(await raw_entry(client, raw_stamps, plates.next()))
                    for _ in range(n):
                        entry = await gateway_entry(client, sim, gw_stamps, plates.next(), opts.read_delay)
                        got["gateway"].append(entry)
                wall = time.monotonic() - t0
                daemon_cpu = cpu_seconds(daemon.proc.pid) - cpu0
                if loader is not None:
                    loader.send_signal(signal.SIGTERM)
                    assert loader.stdout is not None
                    async with asyncio.timeout(30):
                        stats = json.loads(await loader.stdout.readline())
                    await end_child(loader)
                    loader = None
                    out["load_publisher"] = stats
                    rate, sent, cpu = stats["rate"], stats["sent"], stats["cpu"]
                    _progress(f"load publisher: {rate:,.0f} msgs/s, {sent:,} messages, CPU {cpu:.0%}")
                out[f"daemon_cpu_{load}"] = daemon_cpu / wall
                for path in ("raw", "gateway"):
                    r = row(path, load, got[path])
                    rows.append(r)
                    _progress(f"{load}, {path}: p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, max {r.max_ms:.1f} ms")
            out["rows"] = [asdict(r) for r in rows]
        out["sessions_confirmed"] = confirmed(root)
    finally:
        for proc in (hop, loader):
            if proc is not None:
                await end_child(proc)
        daemon.stop()
        await sim.close()
        raw_line.unplug()
    return out


def confirmed(root: Path) -> int:
    conn = connect(db_path(root / "state"), readonly=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM sessions WHERE confirmed_at IS NOT NULL").fetchone()[0])
    finally:
        conn.close()


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(res: dict[str, Any], rate: int) -> str:
    rows = {(r["path"], r["load"]): r for r in res["rows"]}
    lines = [
        "| hop | background | entries | p50 | p99 | max | target | p99 / baseline p99 |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for load in ("idle", "load"):
        bg = "none" if load == "idle" else f"{rate:,} sensor msgs/s"
        base = rows[("raw", load)]
        for path in ("raw", "gateway"):
            r = rows[(path, load)]
            name = "baseline: MQTT in → OPEN out, no decision" if path == "raw" else "gateway: read → decision → OPEN"
            target = "p99 ≤ 10 ms" if path == "gateway" and load == "load" else ""
            if target:
                target += " **met**" if r["p99_ms"] <= 10 else " **missed**"
            ratio = f"{r['p99_ms'] / base['p99_ms']:.1f}x" if path == "gateway" else ""
            lines.append(
                f"| {name} | {bg} | {r['entries']:,} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms "
                f"| {r['max_ms']:.1f} ms | {target} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.lane", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1000, help="measured entries per path and condition (1000)")
    ap.add_argument("--block", type=int, default=100, help="entries per interleaved block (100)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured entries per path first (20)")
    ap.add_argument("--rate", type=int, default=2000, help="background sensor messages per second (2000)")
    ap.add_argument("--sensors", type=int, default=1000, help="sensors the background load reports for (1000)")
    ap.add_argument(
        "--read-delay",
        type=float,
        default=0.0,
        help="seconds from the car on loop A (ARRIVED acknowledged) to its camera read (0: at once, the worst case)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke check: 100 entries per path and condition")
    ap.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON ('-': stdout)")
    ap.add_argument("--profile", metavar="PATH", type=Path, help="run the daemon under cProfile, stats here")
    ap.add_argument("--raw-hop", nargs=2, metavar=("PORT", "TTY"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--tick", type=float, default=0.01, help="the load publisher sends rate x tick messages every tick s (0.01)"
    )
    ap.add_argument(
        "--load-publisher", nargs=4, type=int, metavar=("PORT", "RATE", "SENSORS", "US"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.raw_hop is not None:
        asyncio.run(raw_hop(int(args.raw_hop[0]), args.raw_hop[1]))
        return
    if args.load_publisher is not None:
        load_publisher(*args.load_publisher)
        return
    if args.quick:
        args.entries, args.block, args.warmup = 100, 50, 5
    if min(args.entries, args.block, args.rate, args.sensors) < 1 or args.warmup < 0 or args.tick <= 0:
        ap.error("--entries, --block, --rate, --sensors and --tick must be positive, --warmup >= 0")
    if args.read_delay < 0:
        ap.error("--read-delay must be >= 0")
    profile = args.profile.resolve() if args.profile else None
    opts = Options(args.entries, args.block, args.warmup, args.rate, args.sensors, args.tick, profile, args.read_delay)

    results, run_meta = beside_mosquitto("bench-lane-", lambda root, broker: run(opts, root, broker))
    version, load_before, load_after = run_meta["mosquitto"], run_meta["loadavg_before"], run_meta["loadavg_after"]
    meta = {
        **run_meta,
        "options": {**asdict(opts), "profile": str(opts.profile) if opts.profile else None},
    }
    lp = results.get("load_publisher", {})
    print(
        f"{opts.entries:,} entries per path and condition, each read {opts.read_delay * 1000:.0f} ms after its car's "
        f"ARRIVED; load publisher {lp.get('rate', 0):,.0f} msgs/s "
        f"(its CPU {lp.get('cpu', 0):.0%}); "
        f"daemon CPU {results['daemon_cpu_idle']:.0%} idle, {results['daemon_cpu_load']:.0%} under load; "
        f"{results['sessions_confirmed']:,} sessions confirmed; {version}; Python {platform.python_version()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print(table(results, opts.rate))
    write_json(args.json, meta, results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
