"""Outbox drain: a backlog of events forwarded upstream, next to a raw QoS 1 publish loop; live forwarding latency.

Run: `.venv/bin/python -m bench.drain` (about two minutes here), `--quick` for a smoke check. See bench/README.md,
section Drain.

One mosquitto subprocess (set_tcp_nodelay, no persistence) is the upstream broker. In this process: a real store
on disk, its writer and the upstream service (gateway/services/upstream: the link with its persistent session,
the forwarder reading the outbox in seq order, deleting after PUBACK) as the daemon builds them. The backlog is
committed through the writer with the upstream service not running (sensor transitions, one `slot.status`
event each). Drain: from starting the service until the outbox is empty. Baseline, before and after the drain:
a second `MqttLink` with the same options (another client id), whose session hook publishes the same payloads
(read from the outbox) from memory, QoS 1, the same window in flight: from starting the link until the last
PUBACK. An upstream subscriber in another process (paho, persistent session) checks that each run delivers its
seqs complete and in order, and stamps arrivals for the live run: commits at a steady rate with the forwarder
caught up, latency from the writer's commit listener to the subscriber's arrival (CLOCK_MONOTONIC, one
machine).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import json
import os
import platform
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.ingest import REPO, Mosquitto, beside_mosquitto, cpu_seconds, wait_for_port, write_json
from gateway.config import GatewayConfig, parse_config
from gateway.core.domain import SensorChange, SensorChanges
from gateway.core.plates import PlateKey
from gateway.mqtt.link import Incoming, LinkOptions, MqttLink, Outlet
from gateway.mqtt.topics import Topics
from gateway.services.requests import Requests
from gateway.services.upstream import Upstream
from gateway.services.upstream.connection import link_options
from gateway.store.reads import ReadStore
from gateway.store.schema import connect, db_path
from gateway.store.settings import settings_from_config
from gateway.store.writer import Committed, Writer

GATEWAY_ID = "gw1"
EVENTS = f"central/{GATEWAY_ID}/events"
BATCH = 128  # sensor transitions per fill command, as the ingress batches them
POLL = 0.01


def site_config(state_dir: Path, port: int, slots: int) -> GatewayConfig:
    return parse_config(
        f"""
[gateway]
id = "{GATEWAY_ID}"
state_dir = "{state_dir}"
[broker]
embedded = false
port = 1
[upstream]
host = "127.0.0.1"
port = {port}
topic_root = "central"
outbox_max_bytes = 1073741824
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "S-{1:05d}..S-{slots:05d}" }}]
"""
    )


async def _ignore(_msg: Incoming) -> None:
    return


class Side:
    """The store, its writer and the upstream service, wired as the daemon wires them (no local broker: the
    local link is never started; nothing here looks at the local side)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.db = db_path(config.state_path())
        self.writer = Writer(self.db, config, PlateKey(secrets.token_bytes(32)))
        self.reads = ReadStore(self.db)
        local = Topics(f"parking/{GATEWAY_ID}")
        self.local_link = MqttLink(LinkOptions("127.0.0.1", 1, f"{GATEWAY_ID}-local", local.status), _ignore)
        self.requests = Requests(
            self.writer,
            self.reads,
            local,
            {lot.id for lot in config.lots},
            self.local_link,
            settings=settings_from_config(config),
            key=PlateKey(secrets.token_bytes(32)),
        )
        self.upstream = self._new_upstream()
        self.commit_ns: dict[int, int] = {}
        self.stamping = False
        self._writer_task: asyncio.Task[None] | None = None
        self._upstream_task: asyncio.Task[None] | None = None
        self._flip: dict[str, bool] = {}
        self._sensors = [s.sensor for s in config.slot_specs()]
        self._i = 0

    async def start_writer(self) -> None:
        self._writer_task = asyncio.create_task(self.writer.run())
        await self.writer.wait_ready()
        await self.reads.start()
        self.writer.add_listener(self._on_commit)

    def _on_commit(self, done: Committed) -> None:
        if self.stamping:
            now = time.monotonic_ns()
            for envelope in done.events:
                self.commit_ns[envelope.seq] = now

    def _new_upstream(self) -> Upstream:
        return Upstream(self.config, self.writer, self.db, self.requests)

    async def start_upstream(self) -> None:
        await self.upstream.start()
        self._upstream_task = asyncio.create_task(self.upstream.run())

    async def stop_upstream(self) -> None:
        """Stop the service (as a daemon stopping would); the next start is a fresh one, as after a restart."""
        if self._upstream_task is None:
            return
        self._upstream_task.cancel()
        await asyncio.gather(self._upstream_task, return_exceptions=True)
        self._upstream_task = None
        await self.upstream.stop()
        self.writer.remove_listener(self.upstream.forwarder.on_commit)
        self.upstream = self._new_upstream()

    def changes(self, n: int) -> SensorChanges:
        out = []
        now = time.time()
        for _ in range(n):
            sensor = self._sensors[self._i % len(self._sensors)]
            self._i += 1
            occupied = not self._flip.get(sensor, False)
            self._flip[sensor] = occupied
            out.append(SensorChange(sensor, "occupied" if occupied else "vacant", now))
        return SensorChanges(changes=tuple(out))

    async def commit(self, n: int) -> None:
        reply = await self.writer.submit(self.changes(n))
        if not reply.ok:
            raise SystemExit(f"the writer refused the transitions: {reply}")

    def outbox(self) -> tuple[int, int, int]:
        """(rows, min seq, max seq) of the outbox."""
        conn = connect(self.db, readonly=True)
        try:
            n, lo, hi = conn.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox").fetchone()
            return int(n), int(lo or 0), int(hi or 0)
        finally:
            conn.close()

    def payloads(self) -> list[bytes]:
        conn = connect(self.db, readonly=True)
        try:
            return [bytes(body.encode()) for (body,) in conn.execute("SELECT body FROM outbox ORDER BY seq")]
        finally:
            conn.close()

    async def stop(self) -> None:
        await self.stop_upstream()
        await self.requests.stop()
        if self._writer_task is not None:
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
        await self.reads.stop()


def outbox_empty(db: Path) -> bool:
    conn = connect(db, readonly=True)
    try:
        return conn.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is None
    finally:
        conn.close()


# --- the upstream subscriber, in its own process


def subscriber(port: int) -> None:
    """Child: a persistent paho subscriber of EVENTS. Each stdin line `FIRST LAST ARRIVALS` asks for one run:
    wait until seq LAST has arrived, check that the run's messages are FIRST..LAST in order (a repeat of the
    same seq is counted, not an error), print the verdict as one JSON line (with every arrival time if ARRIVALS
    is 1)."""
    got: list[tuple[int, int]] = []  # (seq, monotonic_ns)
    lock = threading.Lock()
    target = [0]  # the seq the main thread waits for
    arrived = threading.Event()

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        # Cheap on purpose (it shares the 2 cores with what is measured): the body starts
        # {"event_id":"<uuid>","seq":N,... (gateway/core/txn.py), so the first "seq": is the event's.
        now = time.monotonic_ns()
        payload = msg.payload
        at = payload.find(b'"seq":') + 6
        seq = int(payload[at : payload.find(b",", at)])
        with lock:
            got.append((seq, now))
            if seq == target[0]:
                arrived.set()

    subscribed = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-upstream-sub-{os.getpid()}", clean_session=False
    )
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe(EVENTS, qos=1)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(20):
            raise SystemExit("subscriber: no SUBACK")
        print("ready", flush=True)
        cursor = 0
        for line in sys.stdin:
            first, last, with_arrivals = (int(x) for x in line.split())
            scanned = cursor
            while True:
                with lock:
                    arrived.clear()
                    target[0] = last
                    upto = len(got)
                end = next((i for i in range(scanned, upto) if got[i][0] == last), None)
                if end is not None:
                    break
                scanned = upto
                arrived.wait(1.0)
            with lock:
                run = got[cursor : end + 1]
            cursor = end + 1
            seqs = [s for s, _ in run]
            distinct = list(dict.fromkeys(seqs))
            expected = list(range(first, last + 1))
            problem = ""
            if distinct != expected:
                missing = sorted(set(expected) - set(distinct))
                problem = f"missing {len(missing)} (first {missing[:5]})" if missing else "out of order"
            first_at: dict[int, int] = {}
            for s, t in run:
                first_at.setdefault(s, t)
            doc: dict[str, Any] = {
                "messages": len(run),
                "distinct": len(distinct),
                "repeats": len(run) - len(distinct),
                "problem": problem,
                "first_ns": run[0][1],
                "last_ns": run[-1][1],
            }
            if with_arrivals:
                doc["arrivals"] = [[s, first_at[s]] for s in distinct]
            print(json.dumps(doc), flush=True)
    finally:
        client.loop_stop()
        client.disconnect()


class SubscriberProcess:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.drain", "--subscriber", str(port)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def ready(self) -> None:
        line = await asyncio.to_thread(self._line)
        if line.strip() != "ready":
            raise SystemExit(f"the upstream subscriber failed to start: {line!r}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    async def verdict(self, first: int, last: int, *, arrivals: bool = False, timeout: float = 300.0) -> dict[str, Any]:
        """The subscriber's check of one run; stops the bench loudly when it is not complete and in order."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{first} {last} {int(arrivals)}\n")
        self.proc.stdin.flush()
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self._line), timeout)
        except TimeoutError:
            raise SystemExit(f"the upstream subscriber did not get seq {last} in {timeout:.0f} s") from None
        doc: dict[str, Any] = json.loads(line)
        if doc["problem"]:
            raise SystemExit(f"upstream got seqs {first}..{last} wrong: {doc['problem']}")
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# --- measurements


@dataclass(frozen=True, slots=True)
class Drain:
    path: str  # forwarder | raw
    events: int
    seconds: float  # start -> outbox empty (forwarder) / last PUBACK (raw)
    events_s: float
    acked_s: float  # start -> last PUBACK (forwarder: every entry acknowledged)
    subscriber_s: float  # start -> the subscriber has the last one
    cpu_s: float  # this process (forwarder + writer thread, or the raw loop)
    broker_cpu_s: float
    repeats: int


async def raw_run(
    config: GatewayConfig, payloads: list[bytes], window: int, broker: Mosquitto, sub: SubscriberProcess, seqs: range
) -> Drain:
    """The same client stack (MqttLink, Outlet) and window, publishing from memory: no store."""
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def session(outlet: Outlet) -> None:
        inflight: deque[asyncio.Future[int]] = deque()
        for payload in payloads:
            if len(inflight) >= window:
                code = await inflight.popleft()
                if code >= 0x80:
                    raise SystemExit(f"the broker refused a publish (reason code {code:#04x})")
            inflight.append(outlet.publish(EVENTS, payload))
        for fut in inflight:
            await fut
        if not done.done():
            done.set_result(time.monotonic_ns())

    opts = link_options(config, subscriptions=(), extra_inflight=window)
    link = MqttLink(
        dataclasses.replace(opts, client_id=f"{GATEWAY_ID}-raw-{uuid.uuid4().hex[:6]}"), _ignore, on_session=session
    )
    cpu0, broker0 = time.process_time(), cpu_seconds(broker.proc.pid)
    start = time.monotonic_ns()
    task = asyncio.create_task(link.run())
    try:
        end = await asyncio.wait_for(done, 600)
        cpu, broker_cpu = time.process_time() - cpu0, cpu_seconds(broker.proc.pid) - broker0
        verdict = await sub.verdict(seqs.start, seqs.stop - 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    n = len(payloads)
    seconds = (end - start) / 1e9
    return Drain(
        "raw", n, seconds, n / seconds, seconds, (verdict["last_ns"] - start) / 1e9, cpu, broker_cpu, verdict["repeats"]
    )


async def drain_run(side: Side, broker: Mosquitto, sub: SubscriberProcess, seqs: range) -> Drain:
    fwd = side.upstream.forwarder
    n = len(seqs)
    cpu0, broker0 = time.process_time(), cpu_seconds(broker.proc.pid)
    start = time.monotonic_ns()
    await side.start_upstream()
    acked = 0
    async with asyncio.timeout(600):
        while True:
            if not acked and fwd.health()["acked_seq"] >= seqs.stop - 1:
                acked = time.monotonic_ns()
            if acked and outbox_empty(side.db):
                end = time.monotonic_ns()
                break
            await asyncio.sleep(POLL)
    cpu, broker_cpu = time.process_time() - cpu0, cpu_seconds(broker.proc.pid) - broker0
    verdict = await sub.verdict(seqs.start, seqs.stop - 1)
    seconds = (end - start) / 1e9
    return Drain(
        "forwarder",
        n,
        seconds,
        n / seconds,
        (acked - start) / 1e9,
        (verdict["last_ns"] - start) / 1e9,
        cpu,
        broker_cpu,
        verdict["repeats"],
    )


@dataclass(frozen=True, slots=True)
class Live:
    events: int
    seconds: float
    events_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def live_run(side: Side, sub: SubscriberProcess, rate: int, seconds: float) -> Live:
    """One sensor transition per commit (a `slot.status` event, with an `alert` when the slot has no session),
    paced so that `rate` events a second are committed, with the forwarder caught up."""
    side.commit_ns.clear()
    side.stamping = True
    count = int(rate * seconds)
    start = time.monotonic()
    while len(side.commit_ns) < count:
        await side.commit(1)
        delay = start + len(side.commit_ns) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    wall = time.monotonic() - start
    side.stamping = False
    seqs = sorted(side.commit_ns)
    if seqs != list(range(seqs[0], seqs[-1] + 1)):
        raise SystemExit(f"live: the commits' seqs are not contiguous ({len(seqs)} in {seqs[0]}..{seqs[-1]})")
    verdict = await sub.verdict(seqs[0], seqs[-1], arrivals=True)
    lat = [(t - side.commit_ns[s]) / 1e6 for s, t in verdict["arrivals"]]
    return Live(len(lat), wall, len(seqs) / wall, pct(lat, 50), pct(lat, 99), max(lat), sum(lat) / len(lat))


@dataclass(frozen=True, slots=True)
class Options:
    events: int
    live_rate: int
    live_seconds: float
    slots: int
    repeat: int
    profile: Path | None


async def run(opts: Options, root: Path, broker: Mosquitto) -> dict[str, Any]:
    await wait_for_port(broker.port)
    config = site_config(root / "state", broker.port, opts.slots)
    side = Side(config)
    sub = SubscriberProcess(broker.port)
    out: dict[str, Any] = {}
    try:
        await sub.ready()
        await side.start_writer()
        drains = []
        fills = []
        for _ in range(opts.repeat):
            await side.stop_upstream()
            t0 = time.monotonic()
            while side.outbox()[0] < opts.events:
                await asyncio.gather(*(side.commit(BATCH) for _ in range(8)))
            rows, lo, hi = side.outbox()
            if rows != hi - lo + 1:
                raise SystemExit(f"the outbox has {rows} rows for seqs {lo}..{hi}")
            fills.append(time.monotonic() - t0)
            _progress(f"outbox filled: {rows:,} events (seq {lo}..{hi}) in {fills[-1]:.1f} s")
            payloads = side.payloads()
            out["payload_bytes"] = [min(map(len, payloads)), max(map(len, payloads))]
            seqs = range(lo, hi + 1)
            for path in ("raw", "forwarder"):
                if path == "raw":
                    d = await raw_run(config, payloads, side.upstream.forwarder.window, broker, sub, seqs)
                elif opts.profile is not None:
                    prof = cProfile.Profile()
                    prof.enable()
                    d = await drain_run(side, broker, sub, seqs)
                    prof.disable()
                    prof.dump_stats(opts.profile)
                else:
                    d = await drain_run(side, broker, sub, seqs)
                drains.append(asdict(d))
                _progress(
                    f"{path}: {d.events_s:,.0f} events/s ({d.seconds:.2f} s), subscriber done at {d.subscriber_s:.2f} s"
                )
        d = await raw_run(config, payloads, side.upstream.forwarder.window, broker, sub, seqs)
        drains.append(asdict(d))
        _progress(f"raw: {d.events_s:,.0f} events/s ({d.seconds:.2f} s), subscriber done at {d.subscriber_s:.2f} s")
        out["fill_s"] = fills
        out["window"] = side.upstream.forwarder.window
        out["drains"] = drains
        await asyncio.sleep(1.0)
        live = await live_run(side, sub, opts.live_rate, opts.live_seconds)
        out["live"] = asdict(live)
        _progress(f"live at {live.events_s:,.0f} events/s: p50 {live.p50_ms:.2f} ms, p99 {live.p99_ms:.2f} ms")
        out["outbox_after"] = side.outbox()[0]
    finally:
        await side.stop()
        sub.stop()
    return out


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ratios(drains: list[dict[str, Any]]) -> list[float]:
    """Each forwarder drain against the mean of the raw runs just before and just after it."""
    out = []
    for i, d in enumerate(drains):
        if d["path"] == "forwarder":
            around = [drains[i - 1]["events_s"], drains[i + 1]["events_s"]]
            out.append(d["events_s"] / (sum(around) / 2))
    return out


def table(res: dict[str, Any]) -> str:
    drains = res["drains"]
    rs = iter(ratios(drains))
    lines = [
        "| measurement | events | result | target | vs baseline | notes |",
        "|---|---:|---:|---|---:|---|",
    ]
    for d in drains:
        forwarder = d["path"] == "forwarder"
        what = "forwarder drain of the backlog" if forwarder else "raw QoS 1 publish loop (baseline)"
        target = vs = ""
        if forwarder:
            ratio = next(rs)
            target = f"≥ 70 % of raw **{'met' if ratio >= 0.7 else 'missed'}**"
            vs = f"{ratio:.0%} of the raw runs around it"
        acked = f" (last PUBACK {d['acked_s']:.2f} s)" if forwarder else ""
        lines.append(
            f"| {what} | {d['events']:,} | {d['events_s']:,.0f} events/s | {target} | {vs} | {d['seconds']:.2f} s"
            f" to {'outbox empty' if forwarder else 'last PUBACK'}{acked}; subscriber complete and in"
            f" order at {d['subscriber_s']:.2f} s; CPU here {d['cpu_s'] / d['events'] * 1e6:.0f} µs an event"
            f" ({d['cpu_s'] / d['seconds']:.0%} of wall time), mosquitto {d['broker_cpu_s'] / d['seconds']:.0%} |"
        )
    lv = res["live"]
    met = "met" if lv["p99_ms"] <= 20 else "missed"
    lines.append(
        f"| live: commit → upstream subscriber, at {lv['events_s']:,.0f} events/s | {lv['events']:,} "
        f"| p50 {lv['p50_ms']:.2f} ms, p99 {lv['p99_ms']:.2f} ms | p99 ≤ 20 ms **{met}** | | max {lv['max_ms']:.1f} ms,"
        f" mean {lv['mean_ms']:.2f} ms; complete and in order |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="events in the backlog (100000)")
    ap.add_argument("--live-rate", type=int, default=500, help="events per second in the live run (500)")
    ap.add_argument("--live-seconds", type=float, default=20.0, help="length of the live run (20 s)")
    ap.add_argument("--slots", type=int, default=1000, help="slots whose sensors make the events (1000)")
    ap.add_argument("--repeat", type=int, default=2, help="fills of the backlog, each drained after a raw run (2)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 10,000 events, 4 s live")
    ap.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON ('-': stdout)")
    ap.add_argument("--profile", metavar="PATH", type=Path, help="cProfile of the (last) forwarder drain, stats here")
    ap.add_argument("--subscriber", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.subscriber is not None:
        subscriber(args.subscriber)
        return
    if args.quick:
        args.events, args.live_seconds, args.repeat = 10_000, 4.0, 1
    if min(args.events, args.live_rate, args.slots, args.repeat) < 1 or args.live_seconds <= 0:
        ap.error("--events, --live-rate, --slots and --live-seconds must be positive")
    opts = Options(args.events, args.live_rate, args.live_seconds, args.slots, args.repeat, args.profile)

    results, run_meta = beside_mosquitto("bench-drain-", lambda root, broker: run(opts, root, broker))
    version, load_before, load_after = run_meta["mosquitto"], run_meta["loadavg_before"], run_meta["loadavg_after"]
    meta = {
        **run_meta,
        "options": asdict(opts),
    }
    fills = ", ".join(f"{f:.1f}" for f in results["fill_s"])
    print(
        f"{opts.events:,} events backlog, payloads {results['payload_bytes'][0]}-{results['payload_bytes'][1]} B, "
        f"window {results['window']}; filled in {fills} s; {version}; Python {platform.python_version()}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print(table(results))
    write_json(args.json, meta, results)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
