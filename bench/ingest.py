"""Sensor ingest, request round trips and peak RSS of the daemon, next to the raw Mosquitto rate in the same run.

Run: `.venv/bin/python -m bench.ingest` (about a minute and a half here), `--quick` for a smoke check. See
bench/README.md, section Ingest.

One mosquitto subprocess (set_tcp_nodelay) serves the raw and the gateway measurements; the same publisher
(aiomqtt, MQTT 3.1.1, QoS 1, 64 publishes in flight) sends the same sensor messages in both. Raw: a subscriber
process that only counts (aiomqtt, MQTT 5, QoS 1: the daemon's own client settings). Gateway: the daemon
(`python -m gateway run`) as a separate process; a message counts as ingested once the state it leaves is
committed in the store, polled read-only. Requests: enter then exit, one or 16 outstanding, publish -> reply.
Peak RSS: VmHWM of the daemon process, with this mosquitto and with the bundled broker (amqtt, in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import aiomqtt

from gateway.store.schema import connect, db_path
from simulators import rfc3339

GATEWAY_ID = "gw1"
R = f"parking/{GATEWAY_ID}"
LOT = "lot1"
SENSOR_FILTER = "sensors/+/state"
# The daemon's MqttLink keeps 64 QoS 1 publishes in flight; the load publisher does the same.
WINDOW = 64
# One message in five changes its sensor's state (a transition); the other four are heartbeats.
TRANSITION_EVERY = 5
DEBOUNCE = 0.05
POLL = 0.02
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
REPO = Path(__file__).resolve().parent.parent

Message = tuple[str, bytes]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_port(port: int, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


def mqtt_client(port: int, identifier: str, *, v5: bool = False) -> aiomqtt.Client:
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        keepalive=30,
        max_inflight_messages=WINDOW,
        socket_options=(NODELAY,),
    )
    client.pending_calls_threshold = 100_000
    return client


class Mosquitto:
    """A mosquitto subprocess on a free loopback port, with no limit on the messages queued per client."""

    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.exe).exists():
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        # The default max_queued_messages (1000) would drop QoS 1 messages for a subscriber that falls behind.
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_queued_messages 0\n"
        )
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def version(self) -> str:
        out = subprocess.run([self.exe, "-h"], capture_output=True, text=True, check=False).stdout
        return out.splitlines()[0].strip() if out else "unknown"

    def stop(self) -> None:
        _terminate(self.proc)


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _proc_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of a process in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def site_toml(state_dir: Path, port: int, *, embedded: bool, slots: int, mqtt_version: str = "5") -> str:
    width = len(str(slots))
    return f"""
[gateway]
id = "{GATEWAY_ID}"
state_dir = "{state_dir}"
[broker]
embedded = {str(embedded).lower()}
host = "127.0.0.1"
port = {port}
{"allow_anonymous = true" if embedded else f'mqtt_version = "{mqtt_version}"'}
[timing]
debounce = {DEBOUNCE}
[[lots]]
id = "{LOT}"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "S-{1:0{width}d}..S-{slots:0{width}d}" }}]
[[gates]]
id = "in1"
lot = "{LOT}"
direction = "entry"
camera = "cam-in1"
"""


class Daemon:
    """`python -m gateway run` in its own process; its log goes to a file in the work directory."""

    def __init__(
        self, workdir: Path, port: int, *, embedded: bool, slots: int, profile: Path | None, mqtt_version: str = "5"
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.db = db_path(workdir / "state")
        config = workdir / "gateway.toml"
        config.write_text(site_toml(workdir / "state", port, embedded=embedded, slots=slots, mqtt_version=mqtt_version))
        self.log_path = workdir / "gateway.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        prof = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "gateway", "run", "--config", str(config)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        return _proc_status(self.pid)

    async def wait_online(self, timeout: float = 60.0) -> None:
        """Until the daemon has announced `online` (store open, every subscription in place)."""
        try:
            async with asyncio.timeout(timeout):
                await wait_for_port(self.port, timeout)
                async with mqtt_client(self.port, f"bench-status-{uuid.uuid4().hex[:6]}") as client:
                    await client.subscribe(f"{R}/status", qos=1)
                    async for message in client.messages:
                        if message.payload == b"online":
                            return
        except TimeoutError:
            self.stop()
            raise SystemExit(f"the gateway did not come online; its log ends:\n{self.log_tail()}") from None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        _terminate(self.proc, timeout=60.0)  # a profiled daemon writes its stats on the way out
        self._log.close()


@dataclass(frozen=True, slots=True)
class Schedule:
    """Warm-up (one vacant report per sensor), then the measured messages and the states they leave."""

    warmup: list[Message]
    messages: list[Message]
    final: dict[str, str]
    transitions: int


def sensor_ids(slots: int) -> list[str]:
    width = len(str(slots))
    return [f"S-{i:0{width}d}" for i in range(1, slots + 1)]


def schedule(sensors: list[str], count: int) -> Schedule:
    """Round robin over the sensors; sensor j changes state in round r when (r + j + c) % 5 == 4.

    The stagger spreads transitions evenly (20 % of every round); `c` makes the very last message a transition,
    so its commit proves every message before it went through the gateway (one receive loop, in order). A
    sensor changes at most every 5 rounds (5,000 messages at 1,000 sensors): far beyond the debounce, no flaps.
    """
    ts = rfc3339(time.time())

    def report(sensor: str, occupied: bool, seq: int) -> Message:
        doc = {"occupied": occupied, "ts": ts, "seq": seq, "battery": 3.6}
        return f"sensors/{sensor}/state", json.dumps(doc).encode()

    n = len(sensors)
    occupied = dict.fromkeys(sensors, False)
    last_round, last_sensor = divmod(count - 1, n)
    c = (TRANSITION_EVERY - 1 - last_round - last_sensor) % TRANSITION_EVERY
    messages: list[Message] = []
    transitions = 0
    for i in range(count):
        r, j = divmod(i, n)
        sensor = sensors[j]
        if (r + j + c) % TRANSITION_EVERY == TRANSITION_EVERY - 1:
            occupied[sensor] = not occupied[sensor]
            transitions += 1
        messages.append(report(sensor, occupied[sensor], r + 2))
    final = {s: "occupied" if o else "vacant" for s, o in occupied.items()}
    return Schedule([report(s, False, 1) for s in sensors], messages, final, transitions)


async def publish(port: int, messages: list[Message]) -> tuple[float, float]:
    """Publish at QoS 1 with WINDOW in flight; monotonic time of the first publish and of the last PUBACK."""
    async with mqtt_client(port, f"bench-pub-{uuid.uuid4().hex[:6]}") as client:
        window = asyncio.Semaphore(WINDOW)
        tasks: set[asyncio.Task[None]] = set()

        async def one(topic: str, payload: bytes) -> None:
            try:
                await client.publish(topic, payload, qos=1)
            finally:
                window.release()

        start = time.monotonic()
        for topic, payload in messages:
            await window.acquire()
            task = asyncio.create_task(one(topic, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        return start, time.monotonic()


# --- raw: a subscriber process that only counts


async def raw_subscriber(port: int, count: int, protocol: int) -> None:
    """Child process: subscribe, say `ready`, count `count` messages, print their first and last arrival."""
    async with mqtt_client(port, f"bench-sub-{os.getpid()}", v5=protocol == 5) as client:
        await client.subscribe(SENSOR_FILTER, qos=1)
        print("ready", flush=True)
        cpu0 = time.process_time()  # not the interpreter's start-up
        first = last = 0.0
        received = 0
        async for _ in client.messages:
            last = time.monotonic()
            if received == 0:
                first = last
            received += 1
            if received >= count:
                break
        doc = {"count": received, "first": first, "last": last, "cpu_s": time.process_time() - cpu0}
        print(json.dumps(doc), flush=True)


@dataclass(frozen=True, slots=True)
class RawResult:
    protocol: int
    messages: int
    seconds: float
    msgs_s: float
    publish_msgs_s: float
    subscriber_cpu_s: float
    broker_cpu_s: float


async def measure_raw(broker: Mosquitto, messages: list[Message], timeout: float, protocol: int = 5) -> RawResult:
    port = broker.port
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.ingest",
        "--raw-subscriber",
        str(port),
        str(len(messages)),
        str(protocol),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            ready = await proc.stdout.readline()
        if ready.strip() != b"ready":
            raise SystemExit(f"raw subscriber failed to start: {ready!r}")
        broker_cpu = cpu_seconds(broker.proc.pid)
        start, acked = await publish(port, messages)
        try:
            async with asyncio.timeout(timeout):
                line = await proc.stdout.readline()
        except TimeoutError:
            raise SystemExit(f"raw subscriber did not receive {len(messages)} messages in {timeout:.0f} s") from None
        done = json.loads(line)
        broker_cpu = cpu_seconds(broker.proc.pid) - broker_cpu
        n, seconds = len(messages), done["last"] - start
        return RawResult(protocol, n, seconds, n / seconds, n / (acked - start), done["cpu_s"], broker_cpu)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


# --- gateway ingest


@dataclass(frozen=True, slots=True)
class IngestResult:
    messages: int
    transitions_published: int
    transitions_committed: int
    seconds: float
    msgs_s: float
    publish_msgs_s: float
    daemon_cpu_s: float
    broker_cpu_s: float
    rss_peak_kib: int


class IngestStuck(Exception):
    pass


async def wait_states(conn: sqlite3.Connection, expected: dict[str, str], timeout: float) -> float:
    """Poll the store until every sensor's committed state is the expected one; monotonic time of that poll."""
    deadline = time.monotonic() + timeout
    while True:
        rows = conn.execute("SELECT sensor, sensor_state FROM slots").fetchall()
        now = time.monotonic()
        wrong = [(sensor, state) for sensor, state in rows if expected.get(sensor, state) != state]
        if not wrong:
            return now
        if now > deadline:
            sample = ", ".join(f"{sensor} is {state}, last reported {expected[sensor]}" for sensor, state in wrong[:5])
            raise IngestStuck(f"after {timeout:.0f} s, {len(wrong)} sensors differ from their last report: {sample}")
        await asyncio.sleep(POLL)


async def measure_ingest(daemon: Daemon, broker: Mosquitto | None, plan: Schedule, timeout: float) -> IngestResult:
    """`broker`: the external one, for its CPU time; the bundled broker's is part of the daemon's."""
    conn = connect(daemon.db, readonly=True)
    try:
        await publish(daemon.port, plan.warmup)
        await wait_states(conn, {s: "vacant" for s in plan.final}, timeout)
        seq0 = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
        cpu0 = cpu_seconds(daemon.pid)
        broker0 = cpu_seconds(broker.proc.pid) if broker is not None else 0.0
        start, acked = await publish(daemon.port, plan.messages)
        try:
            end = await wait_states(conn, plan.final, timeout)
        except IngestStuck as exc:
            raise SystemExit(f"{exc}\nthe gateway's log ends:\n{daemon.log_tail()}") from None
        cpu = cpu_seconds(daemon.pid) - cpu0
        broker_cpu = cpu_seconds(broker.proc.pid) - broker0 if broker is not None else 0.0
        committed = conn.execute(
            # Sensor transitions only: on the bundled broker's daemon the window row's camera reads left sessions
            # on their way, whose slots also change status when their sensors move (re-seats, arrivals).
            "SELECT COUNT(*) FROM outbox WHERE seq > ? AND type = 'slot.status'"
            " AND json_extract(body, '$.reason') LIKE 'sensor.%'",
            (seq0,),
        ).fetchone()[0]
    finally:
        conn.close()
    n = len(plan.messages)
    seconds = end - start
    return IngestResult(
        n,
        plan.transitions,
        committed,
        seconds,
        n / seconds,
        n / (acked - start),
        cpu,
        broker_cpu,
        daemon.memory()["VmHWM"],
    )


# --- requests


@dataclass(frozen=True, slots=True)
class RequestResult:
    outstanding: int
    requests: int
    seconds: float
    round_trips_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class WindowResult:
    reads: int
    p50_ms: float
    p99_ms: float
    max_ms: float


async def measure_window(port: int, reads: int) -> WindowResult:
    """Camera reads one at a time: from the broker's PUBACK to the camera (the bundled broker acknowledges on
    receipt) to the decision's `session.started` on R/events, i.e. after its commit: guarantee 3's window."""
    async with mqtt_client(port, f"bench-window-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(f"{R}/events", qos=1)
        started: asyncio.Queue[float] = asyncio.Queue()  # one read at a time: the next decision is its own

        async def events() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if json.loads(message.payload).get("type") == "session.started":
                    started.put_nowait(time.perf_counter())

        pump = asyncio.create_task(events())
        windows: list[float] = []
        try:
            for n in range(reads):
                plate = f"WN{n:05d}"
                body = json.dumps({"event_id": plate, "plate": plate})
                await client.publish("cameras/cam-in1/reads", body, qos=1)
                acked = time.perf_counter()
                async with asyncio.timeout(30):
                    windows.append(await started.get() - acked)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump
    q = statistics.quantiles(windows, n=100, method="inclusive")
    return WindowResult(reads, q[49] * 1e3, q[98] * 1e3, max(windows) * 1e3)


async def measure_requests(port: int, outstanding: int, pairs: int, warmup: int, tag: str) -> RequestResult:
    """`outstanding` workers, each looping enter then exit of its own new plate; latency is publish -> reply."""
    async with mqtt_client(port, f"bench-req-{tag}") as client:
        await client.subscribe(f"{R}/response/+", qos=1)
        loop = asyncio.get_running_loop()
        pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

        async def replies() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                doc = json.loads(message.payload)
                fut = pending.pop(doc.get("transaction"), None)
                if fut is not None and not fut.done():
                    fut.set_result(doc)

        async def call(verb: str, body: dict[str, str]) -> float:
            transaction = uuid.uuid4().hex
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            pending[transaction] = fut
            t0 = time.perf_counter()
            await client.publish(f"{R}/request/{verb}", json.dumps({"transaction": transaction, **body}), qos=1)
            async with asyncio.timeout(30):
                doc = await fut
            elapsed = time.perf_counter() - t0
            if doc["status"] != "ok":
                raise SystemExit(f"{verb} {body} failed: {doc}")
            return elapsed

        async def worker(w: int, first: int, count: int, out: list[float]) -> None:
            for k in range(first, first + count):
                plate = f"{tag}{w:02d}X{k:05d}"
                out.append(await call("enter", {"vehicle": plate, "lot": LOT}))
                out.append(await call("exit", {"vehicle": plate}))

        pump = asyncio.create_task(replies())
        try:
            per_worker = max(1, pairs // outstanding)
            await asyncio.gather(*(worker(w, 0, max(1, warmup // outstanding), []) for w in range(outstanding)))
            latencies: list[float] = []
            start = time.perf_counter()
            await asyncio.gather(*(worker(w, warmup, per_worker, latencies) for w in range(outstanding)))
            seconds = time.perf_counter() - start
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return RequestResult(outstanding, len(latencies), seconds, len(latencies) / seconds, q[49] * 1e3, q[98] * 1e3)


# --- the whole run


@dataclass(frozen=True, slots=True)
class Options:
    messages: int
    embedded_messages: int
    slots: int
    pairs: int
    outstanding: int
    timeout: float
    profile: Path | None
    versions: tuple[str, ...] = ("5", "3.1.1")
    window_reads: int = 500


async def burst(opts: Options, root: Path, broker: Mosquitto, plan: Schedule, version: str) -> dict[str, Any]:
    """A fresh daemon speaking `version` to Mosquitto takes the whole burst; VmHWM right after it is its peak."""
    daemon = Daemon(
        root / f"external-{version}",
        broker.port,
        embedded=False,
        slots=opts.slots,
        profile=opts.profile,
        mqtt_version=version,
    )
    out: dict[str, Any] = {"mqtt_version": version}
    try:
        await daemon.wait_online()
        out["rss_idle_kib"] = daemon.memory()["VmRSS"]
        ingest = await measure_ingest(daemon, broker, plan, opts.timeout)
        out["ingest"] = asdict(ingest)
        _progress(f"gateway ingest, MQTT {version}: {ingest.msgs_s:,.0f} msgs/s, VmHWM {_mib(ingest.rss_peak_kib)}")
        if version == opts.versions[0]:
            requests = []
            for outstanding, tag in ((1, "SQ"), (opts.outstanding, "CC")):
                r = await measure_requests(broker.port, outstanding, opts.pairs, 2 * outstanding, tag)
                requests.append(asdict(r))
                _progress(f"requests, {outstanding} outstanding: {r.round_trips_s:,.0f}/s, p99 {r.p99_ms:.1f} ms")
            out["requests"] = requests
        out["rss_peak_kib"] = daemon.memory()["VmHWM"]
    finally:
        daemon.stop()
    return out


async def run(opts: Options, root: Path, broker: Mosquitto) -> dict[str, Any]:
    await wait_for_port(broker.port)
    sensors = sensor_ids(opts.slots)
    plan = schedule(sensors, opts.messages)
    sizes = [len(payload) for _, payload in plan.messages]
    out: dict[str, Any] = {"payload_bytes": [min(sizes), max(sizes)]}

    raw_before = await measure_raw(broker, plan.messages, opts.timeout)
    _progress(f"raw: {raw_before.msgs_s:,.0f} msgs/s")
    raw_311 = await measure_raw(broker, plan.messages, opts.timeout, protocol=3)
    _progress(f"raw, MQTT 3.1.1 subscriber: {raw_311.msgs_s:,.0f} msgs/s")

    bursts = [await burst(opts, root, broker, plan, version) for version in opts.versions]

    raw_after = await measure_raw(broker, plan.messages, opts.timeout)
    _progress(f"raw again: {raw_after.msgs_s:,.0f} msgs/s")

    out.update(raw=[asdict(raw_before), asdict(raw_after)], raw_311=asdict(raw_311), bursts=bursts)
    bundled = Daemon(root / "embedded", free_port(), embedded=True, slots=opts.slots, profile=None)
    try:
        await bundled.wait_online()
        out["rss_idle_embedded_kib"] = bundled.memory()["VmRSS"]
        window = await measure_window(bundled.port, opts.window_reads)
        out["window_embedded"] = asdict(window)
        _progress(f"bundled broker, PUBACK -> commit: p50 {window.p50_ms:.1f} ms, p99 {window.p99_ms:.1f} ms")
        if opts.embedded_messages:
            embedded = await measure_ingest(bundled, None, schedule(sensors, opts.embedded_messages), opts.timeout)
            _progress(f"gateway ingest, bundled broker: {embedded.msgs_s:,.0f} msgs/s")
            out["ingest_embedded"] = asdict(embedded)
        out["rss_peak_embedded_kib"] = bundled.memory()["VmHWM"]
    finally:
        bundled.stop()
    return out


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def _cpu(seconds: float, wall: float) -> str:
    return f"{seconds / wall:.0%}"


def table(res: dict[str, Any]) -> str:
    """The markdown table; the target compares the gateway with the best raw rate of the run, either protocol."""
    v5, v311 = res["raw"], res["raw_311"]
    best_v5 = max(v5, key=lambda r: r["msgs_s"])
    raw = max(best_v5["msgs_s"], v311["msgs_s"])
    both = ", ".join(f"{r['msgs_s']:,.0f}" for r in v5)
    rows = [
        "| measurement | rate | p50 | p99 | notes |",
        "|---|---:|---:|---:|---|",
        f"| raw Mosquitto pub → sub, MQTT 5 subscriber | {best_v5['msgs_s']:,.0f} msgs/s | | | best of 2 "
        f"({both}: before and after the gateway runs); subscriber CPU "
        f"{_cpu(best_v5['subscriber_cpu_s'], best_v5['seconds'])}, mosquitto CPU "
        f"{_cpu(best_v5['broker_cpu_s'], best_v5['seconds'])} of wall time |",
        f"| raw Mosquitto pub → sub, MQTT 3.1.1 subscriber | {v311['msgs_s']:,.0f} msgs/s | | | subscriber CPU "
        f"{_cpu(v311['subscriber_cpu_s'], v311['seconds'])}, mosquitto CPU "
        f"{_cpu(v311['broker_cpu_s'], v311['seconds'])} of wall time |",
    ]
    for b in res["bursts"]:
        ing = b["ingest"]
        rows.append(
            f"| burst of {ing['messages']:,}, gateway ingest, Mosquitto, daemon on MQTT {b['mqtt_version']} "
            f"| {ing['msgs_s']:,.0f} msgs/s | | | **{ing['msgs_s'] / raw:.0%} of the best raw rate**; "
            f"**VmHWM {_mib(ing['rss_peak_kib'])}** right after the burst ({_mib(b['rss_idle_kib'])} idle before); "
            f"{ing['transitions_committed']:,} of {ing['transitions_published']:,} transitions committed; publisher "
            f"{ing['publish_msgs_s']:,.0f} msgs/s; daemon CPU {_cpu(ing['daemon_cpu_s'], ing['seconds'])} "
            f"({ing['daemon_cpu_s'] / ing['messages'] * 1e6:.0f} µs a message), "
            f"mosquitto CPU {_cpu(ing['broker_cpu_s'], ing['seconds'])} of wall time |"
        )
    for r in res["bursts"][0].get("requests", []):
        rows.append(
            f"| enter/exit requests, {r['outstanding']} outstanding | {r['round_trips_s']:,.0f} round trips/s "
            f"| {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['requests']:,} requests |"
        )
    rows.append(
        f"| daemon peak RSS (VmHWM), Mosquitto, MQTT {res['bursts'][0]['mqtt_version']} "
        f"| {_mib(res['bursts'][0]['rss_peak_kib'])} | | | read after the burst and the request rows |"
    )
    w = res["window_embedded"]
    rows.append(
        f"| bundled broker: camera read PUBACKed (on receipt) → its decision committed | | {w['p50_ms']:.1f} ms "
        f"| {w['p99_ms']:.1f} ms | guarantee 3's window; {w['reads']:,} reads one at a time, max {w['max_ms']:.1f} ms |"
    )
    emb = res.get("ingest_embedded")
    if emb is not None:
        rows += [
            f"| gateway sensor ingest, bundled broker | {emb['msgs_s']:,.0f} msgs/s | | | {emb['messages']:,} msgs, "
            f"{emb['transitions_committed']:,} of {emb['transitions_published']:,} transitions committed; daemon "
            f"CPU {_cpu(emb['daemon_cpu_s'], emb['seconds'])} of wall time |",
        ]
    rows.append(
        f"| daemon peak RSS (VmHWM), bundled broker | {_mib(res['rss_peak_embedded_kib'])} | | | "
        f"{_mib(res['rss_idle_embedded_kib'])} after start |"
    )
    return "\n".join(rows)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def beside_mosquitto(prefix: str, run: Callable[[Path, Mosquitto], Coroutine[Any, Any, T]]) -> tuple[T, dict[str, Any]]:
    """`run(workdir, broker)` with a fresh Mosquitto in a temporary directory, both gone however it ends (SIGTERM
    stops it like Ctrl-C: every `finally` runs, children included); also what the run was: versions, cores, load
    average before and after."""
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        broker = Mosquitto(root)
        try:
            load_before = os.getloadavg()
            results = asyncio.run(run(root, broker))
            load_after = os.getloadavg()
            version = broker.version()
        finally:
            broker.stop()
    meta = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "mosquitto": version,
        "nproc": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    return results, meta


def write_json(path: Path | None, meta: dict[str, Any], results: Any) -> None:
    """`--json PATH` (`-`: stdout)."""
    if path is None:
        return
    doc = json.dumps({"run": meta, "results": results}, indent=2)
    if str(path) == "-":
        print(doc)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000, help="sensor messages per measurement (100000)")
    ap.add_argument(
        "--embedded-messages",
        type=int,
        default=20_000,
        help="sensor messages through the bundled broker (20000; 0: no ingest run there)",
    )
    ap.add_argument("--slots", type=int, default=1000, help="slots, one sensor each (1000)")
    ap.add_argument("--pairs", type=int, default=1000, help="measured enter+exit pairs per request run (1000)")
    ap.add_argument("--outstanding", type=int, default=16, help="requests in flight in the concurrent run (16)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one measurement (120)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 10,000 messages, 200 pairs")
    ap.add_argument(
        "--mqtt-version",
        choices=["5", "3.1.1"],
        action="append",
        help="what the daemon speaks to Mosquitto, one burst each ([broker] mqtt_version; default: 5 and 3.1.1)",
    )
    ap.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON ('-': stdout)")
    ap.add_argument("--profile", metavar="PATH", type=Path, help="run the Mosquitto daemon under cProfile, stats here")
    ap.add_argument("--raw-subscriber", nargs=3, type=int, metavar=("PORT", "COUNT", "PROTO"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.raw_subscriber is not None:
        asyncio.run(raw_subscriber(*args.raw_subscriber))
        return
    if args.quick:
        args.messages, args.embedded_messages, args.pairs = 10_000, min(args.embedded_messages, 5_000), 200
    if min(args.messages, args.slots, args.pairs, args.outstanding) < 1 or args.embedded_messages < 0:
        ap.error("--messages, --slots, --pairs and --outstanding must be positive, --embedded-messages >= 0 (0: skip)")
    opts = Options(
        args.messages,
        args.embedded_messages,
        args.slots,
        args.pairs,
        args.outstanding,
        args.timeout,
        args.profile.resolve() if args.profile else None,
        tuple(args.mqtt_version or ("5", "3.1.1")),
    )

    results, run_meta = beside_mosquitto("bench-ingest-", lambda root, broker: run(opts, root, broker))
    version, load_before, load_after = run_meta["mosquitto"], run_meta["loadavg_before"], run_meta["loadavg_after"]
    meta = {
        **run_meta,
        "slots": opts.slots,
        "debounce_s": DEBOUNCE,
    }
    print(
        f"{opts.slots:,} sensors, debounce {DEBOUNCE} s, payloads {results['payload_bytes'][0]}-"
        f"{results['payload_bytes'][1]} B; {version};"
        f" Python {platform.python_version()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print(table(results))
    write_json(args.json, meta, results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
