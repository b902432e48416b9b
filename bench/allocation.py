"""Enter+exit pairs per second through the writer, next to a raw sqlite3 baseline running the same statements.

Run: `.venv/bin/python -m bench.allocation` (about a minute here), `--quick` for a smoke check. See bench/README.md.

Writer path: C concurrent clients, each looping enter (a new plate at gate in1) then exit of its own car (gate
out1), through `Writer.submit`; the writer group-commits what is queued. Raw path: one thread, plain sqlite3, the
same statements with the same parameters and JSON bodies, the same pragmas (`gateway.store.connect`), grouped into
transactions of the batch size the writer reached in that configuration; and once more with one command per
transaction. The ratio writer/raw is the cost of the Python/asyncio layer around the SQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, parse_config
from gateway.core import allocation
from gateway.core.clock import iso_ms
from gateway.core.domain import Enter, Exit, Reserve
from gateway.core.exits import elapsed_s
from gateway.core.plates import PlateKey
from gateway.core.pricing import fee
from gateway.core.settings import Tariff
from gateway.core.slots import HOLDS, alloc_rank, derive_status, displaced
from gateway.store.schema import Synchronous, connect, db_path, migrate
from gateway.store.settings import tariff_from_config
from gateway.store.sync import sync_config
from gateway.store.writer import Writer

KEY = PlateKey(b"k" * 32)
LOT = "lot1"
GATE_IN = "in1"
GATE_OUT = "out1"
HOLD_AHEAD = 1800.0  # [timing] hold_ahead's default, as in bench_config


@dataclass(frozen=True, slots=True)
class Segment:
    """One measured round of each path, pairs per second."""

    writer_pairs_s: float
    raw_pairs_s: float
    raw_1cmd_pairs_s: float
    avg_batch: float


@dataclass(frozen=True, slots=True)
class Result:
    """Medians over the segments; `pairs` is the total measured per path."""

    slots: int
    synchronous: str
    clients: int
    pairs: int
    writer_pairs_s: float
    raw_pairs_s: float
    ratio: float
    raw_1cmd_pairs_s: float
    avg_batch: float
    segments: list[Segment]


def bench_config(state_dir: Path, slots: int) -> GatewayConfig:
    """One lot, one zone of `slots` standard slots, an entry and an exit lane without barriers, a tariff."""
    width = max(3, len(str(slots)))
    return parse_config(
        f"""
[gateway]
id = "gw-bench"
state_dir = "{state_dir}"
[broker]
allow_anonymous = true
[[lots]]
id = "{LOT}"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-{"1".zfill(width)}..A-{str(slots).zfill(width)}" }}]
[[gates]]
id = "{GATE_IN}"
lot = "{LOT}"
direction = "entry"
[[gates]]
id = "{GATE_OUT}"
lot = "{LOT}"
direction = "exit"
[[tariffs]]
lot = "{LOT}"
currency = "EUR"
free_minutes = 15
per_hour = 250
"""
    )


def plate(client: int, n: int) -> str:
    return f"C{client:03d}P{n:07d}"


# --- writer path ---


async def _client(w: Writer, client: int, first: int, count: int) -> None:
    for n in range(first, first + count):
        p = plate(client, n)
        r = await w.submit(Enter(vehicle=p, gate=GATE_IN))
        if not r.ok:
            raise RuntimeError(f"enter {p}: {r.code} {r.message}")
        r = await w.submit(Exit(vehicle=p, gate=GATE_OUT))
        if not r.ok:
            raise RuntimeError(f"exit {p}: {r.code} {r.message}")


async def writer_segment(w: Writer, clients: int, first: int, per_client: int) -> tuple[float, float]:
    """Pairs per second and commands per commit while C clients each run `per_client` pairs."""
    commits, commands = w.commits, w.commands
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(w, c, first, per_client) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    return per_client * clients / elapsed, (w.commands - commands) / (w.commits - commits)


# --- raw sqlite3 path: the statements gateway.allocation.enter and gateway.exits.exit_ execute for a lane ---


class RawStore:
    """Straight-line sqlite3 doing what the writer does for an enter and an exit at a gate, nothing else."""

    def __init__(self, conn: sqlite3.Connection, gateway_id: str, tariff: Tariff | None) -> None:
        self.conn = conn
        self.gateway_id = gateway_id
        self.tariff = tariff
        self.seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
        self.added: list[str] = []  # this transaction's event bodies, for the outbox size

    def _emit(self, now: float, type_: str, **fields: Any) -> None:
        event = {
            "event_id": str(uuid.uuid4()),
            "seq": self.seq,
            "ts": iso_ms(now),
            "gateway": self.gateway_id,
            "type": type_,
            **fields,
        }
        body = json.dumps(event, separators=(",", ":"))
        self.conn.execute(
            "INSERT INTO outbox (seq, event_id, type, created_at, body) VALUES (?, ?, ?, ?, ?)",
            (self.seq, event["event_id"], type_, now, body),
        )
        self.added.append(body)
        self.seq += 1

    def _refresh(self, now: float, slot: str, reason: str) -> None:
        lot, zone, status, blocked, sensor_state, old_rank = self.conn.execute(
            "SELECT lot, zone, status, blocked, sensor_state, alloc_rank FROM slots WHERE id = ?", (slot,)
        ).fetchone()
        session = self.conn.execute("SELECT id FROM sessions WHERE slot = ? AND state = 'active'", (slot,)).fetchone()
        held, ahead = self.conn.execute(HOLDS, (slot,)).fetchone()
        new = derive_status(session is not None, bool(blocked), sensor_state, bool(held))
        rank = alloc_rank(sensor_state, bool(ahead), displaced(self.conn, slot))
        if new != status:
            self.conn.execute(
                "UPDATE slots SET status = ?, since = ?, alloc_rank = ? WHERE id = ?", (new, now, rank, slot)
            )
            if "occupied" in (new, status):
                step = 1 if new == "occupied" else -1
                self.conn.execute("UPDATE lots SET occupied = occupied + ? WHERE id = ?", (step, lot))
            self._emit(
                now, "slot.status", slot=slot, lot=lot, zone=zone, status=new, sensor=sensor_state, reason=reason
            )
        elif rank != old_rank:
            self.conn.execute("UPDATE slots SET alloc_rank = ? WHERE id = ?", (rank, slot))

    def enter(self, now: float, p: str) -> None:
        self.conn.execute("SAVEPOINT cmd")
        token = KEY.token(p)
        existing = self.conn.execute(
            "SELECT id, slot, zone FROM sessions WHERE lot = ? AND vehicle = ? AND state = 'active'", (LOT, token)
        ).fetchone()
        if existing is not None:
            raise RuntimeError(f"{p} is already parked")
        booked = self.conn.execute(
            "SELECT * FROM reservations WHERE lot = ? AND vehicle = ? AND state IN ('booked', 'held')"
            " AND start_at <= ? ORDER BY start_at",
            (LOT, token, now + HOLD_AHEAD),
        ).fetchall()
        if booked:
            raise RuntimeError(f"{p} has a reservation")
        slot, zone, _ = self.conn.execute(allocation._PICK_ANY_ZONE, (LOT, "standard", 1)).fetchone()
        session_id = str(uuid.uuid4())
        self.conn.execute(
            "INSERT INTO sessions (id, lot, zone, home_zone, slot, plate, vehicle, state, entry_gate, reservation_id,"
            " started_at, confirmed_at, factor) VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?)",
            (session_id, LOT, zone, zone, slot, p, token, GATE_IN, None, now, now, "1"),
        )
        self._emit(
            now,
            "session.started",
            session_id=session_id,
            lot=LOT,
            zone=zone,
            slot=slot,
            vehicle=token,
            gate=GATE_IN,
            reservation_id=None,
        )
        self._emit(now, "session.confirmed", session_id=session_id, gate=GATE_IN)
        # reconcile.session_confirmed: the arrival window starts; a vacancy countdown only if the sensor says vacant.
        self.conn.execute("UPDATE sessions SET confirmed_timer = ? WHERE id = ?", (time.monotonic(), session_id))
        self.conn.execute(
            "SELECT t.sensor_state FROM sessions s JOIN slots t ON t.id = s.slot WHERE s.id = ?", (session_id,)
        ).fetchone()
        self._refresh(now, slot, "session.started")
        self.conn.execute("RELEASE cmd")

    def exit(self, now: float, p: str) -> None:
        self.conn.execute("SAVEPOINT cmd")
        rows = self.conn.execute(
            "SELECT * FROM sessions WHERE lot = ? AND state = 'active' AND plate = ?", (LOT, p)
        ).fetchall()
        session_id, lot, _zone, slot, _plate, vehicle = rows[0][:6]
        started_at = rows[0][10]
        duration = elapsed_s(started_at, now)
        amount = fee(self.tariff, started_at, started_at + duration, 1)
        currency = self.tariff.currency if self.tariff is not None else None
        self.conn.execute(
            "UPDATE sessions SET state = 'ended', ended_at = ?, exit_gate = ?, duration_s = ?, fee_amount = ?,"
            " fee_currency = ? WHERE id = ?",
            (now, GATE_OUT, duration, amount, currency, session_id),
        )
        self._emit(
            now,
            "session.ended",
            session_id=session_id,
            lot=lot,
            slot=slot,
            vehicle=vehicle,
            gate=GATE_OUT,
            duration_s=duration,
            fee={"amount": amount, "currency": currency},
        )
        self.conn.execute("DELETE FROM exit_refusals WHERE session_id = ?", (session_id,))
        self._refresh(now, slot, "session.ended")
        # reconcile.session_closed: no vacate countdown any more; a car still reported in the slot is someone else's.
        self.conn.execute("DELETE FROM deadlines WHERE kind = ? AND subject = ?", ("session.vacate", session_id))
        # ... and it forgets a slot it was re-seated away from, with that slot's deadlines.
        self.conn.execute("SELECT reseated_from, confirmed_timer FROM sessions WHERE id = ?", (session_id,)).fetchone()
        self.conn.execute("DELETE FROM deadlines WHERE kind = ? AND subject = ?", ("session.reseated", session_id))
        self.conn.execute("DELETE FROM deadlines WHERE kind = ? AND subject = ?", ("session.recheck", session_id))
        self.conn.execute("UPDATE sessions SET reseated_from = NULL, reseated_seen = NULL WHERE id = ?", (session_id,))
        self.conn.execute("SELECT * FROM slots WHERE id = ?", (slot,)).fetchone()
        self.conn.execute("RELEASE cmd")

    def batch(self, cmds: list[tuple[bool, str]]) -> None:
        """One transaction: (is_enter, plate) commands, the next_seq update, COMMIT."""
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        for is_enter, p in cmds:
            if is_enter:
                self.enter(now, p)
            else:
                self.exit(now, p)
        self.conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(self.seq),))
        self.conn.execute(
            "UPDATE outbox_size SET rows = rows + ?, bytes = bytes + ?", (len(self.added), sum(map(len, self.added)))
        )
        self.added.clear()
        self.conn.execute("COMMIT")


def open_raw(cfg: GatewayConfig, sync: Synchronous) -> RawStore:
    conn = connect(db_path(cfg.state_path()), synchronous=sync)
    conn.row_factory = None
    migrate(conn)
    sync_config(conn, {lot.id: lot.name for lot in cfg.lots}, cfg.slot_specs(), time.time())
    tariff = next((tariff_from_config(t, cfg.gateway.timezone) for t in cfg.tariffs if t.lot == LOT), None)
    return RawStore(conn, cfg.gateway.id, tariff)


def raw_commands(clients: int, first: int, per_client: int) -> Iterator[tuple[bool, str]]:
    """The writer's traffic pattern: C cars in flight, each alternating enter and exit, served round-robin."""
    ready: deque[tuple[int, int, bool]] = deque((c, first, True) for c in range(clients))
    while ready:
        c, n, is_enter = ready.popleft()
        yield is_enter, plate(c, n)
        if is_enter:
            ready.append((c, n, False))
        elif n + 1 < first + per_client:
            ready.append((c, n + 1, True))


def batch_sizes(avg: float) -> Iterator[int]:
    """Integer batch sizes whose running mean stays on `avg` (2.5 gives 2s and 3s)."""
    done = 0
    while True:
        size = max(1, round((done + 1) * avg) - round(done * avg))
        done += 1
        yield size


def drive_raw(store: RawStore, cmds: Iterator[tuple[bool, str]], avg_batch: float) -> None:
    sizes = batch_sizes(avg_batch)
    pending: list[tuple[bool, str]] = []
    size = next(sizes)
    for cmd in cmds:
        pending.append(cmd)
        if len(pending) == size:
            store.batch(pending)
            pending, size = [], next(sizes)
    if pending:
        store.batch(pending)


def raw_segment(store: RawStore, clients: int, first: int, per_client: int, avg_batch: float) -> float:
    t0 = time.perf_counter()
    drive_raw(store, raw_commands(clients, first, per_client), avg_batch)
    return per_client * clients / (time.perf_counter() - t0)


# --- the baseline must stay honest: compare its SQL with the writer's, statement by statement ---

_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b|\?")


def _shape(sql: str) -> str:
    return _LITERAL.sub("?", " ".join(sql.split()))


def _traced(conn: sqlite3.Connection) -> tuple[list[str], Callable[[], None]]:
    seen: list[str] = []
    conn.set_trace_callback(lambda sql: seen.append(_shape(sql)))
    return seen, lambda: conn.set_trace_callback(None)


async def check_same_sql(root: Path) -> int:
    """Trace one enter and one exit on both paths; raise if the statement sequences differ. Returns the count."""
    cfg = bench_config(root / "check-writer", 10)
    w = Writer(db_path(cfg.state_path()), cfg, KEY, synchronous="FULL")
    task = asyncio.create_task(w.run())
    try:
        await w.wait_ready()
        conn = w._conn  # the writer's own connection: the only way to see what it executes
        assert conn is not None
        writer_sql, stop = _traced(conn)
        await _client(w, 0, 0, 1)
        stop()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    store = open_raw(bench_config(root / "check-raw", 10), "FULL")
    raw_sql, stop = _traced(store.conn)
    drive_raw(store, raw_commands(1, 0, 1), 1)
    stop()
    store.conn.close()
    if writer_sql != raw_sql:
        diff = [f"  writer: {a}\n  raw:    {b}" for a, b in zip(writer_sql, raw_sql, strict=False) if a != b]
        raise SystemExit(
            f"raw baseline drifted from the writer ({len(writer_sql)} vs {len(raw_sql)} statements):\n"
            + "\n".join(diff[:5])
        )
    return len(writer_sql)


# --- driver ---


@dataclass
class _Size:
    """The three stores of one lot size: the writer's, the raw baseline's and the raw one-command baseline's."""

    slots: int
    writer: Writer
    task: asyncio.Task[None]
    raw: RawStore
    raw1: RawStore


async def measure(
    root: Path, sizes: list[int], sync: Synchronous, clients: int, pairs: int, warmup: int, repeat: int
) -> list[Result]:
    """Warm every store up, then run `repeat` rounds of (per size: writer, raw, raw-1 segment); take medians.

    Interleaving sizes and paths spreads the machine's drift (other load, CPU steal, disk) over every column
    instead of one. The raw segments run in this thread and block the loop while the writers sit idle.
    """
    setups: list[_Size] = []
    try:
        for n in sizes:
            cfg = bench_config(root / f"w-{n}-{sync}", n)
            w = Writer(db_path(cfg.state_path()), cfg, KEY, synchronous=sync)
            raw, raw1 = (open_raw(bench_config(root / f"{d}-{n}-{sync}", n), sync) for d in ("r", "r1"))
            setups.append(_Size(n, w, asyncio.create_task(w.run()), raw, raw1))
            await w.wait_ready()
        warm, per_client = max(1, warmup // clients), max(1, pairs // (clients * repeat))
        for z in setups:
            _, avg = await writer_segment(z.writer, clients, 0, warm)
            raw_segment(z.raw, clients, 0, warm, avg)
            raw_segment(z.raw1, clients, 0, warm, 1.0)
        segs: dict[int, list[Segment]] = {z.slots: [] for z in setups}
        for i in range(repeat):
            first = warm + i * per_client
            for z in setups:
                writer_s, avg = await writer_segment(z.writer, clients, first, per_client)
                raw_s = raw_segment(z.raw, clients, first, per_client, avg)
                raw1_s = raw_segment(z.raw1, clients, first, per_client, 1.0)
                segs[z.slots].append(Segment(writer_s, raw_s, raw1_s, avg))
    finally:
        for z in setups:
            z.task.cancel()
            await asyncio.gather(z.task, return_exceptions=True)
            z.raw.conn.close()
            z.raw1.conn.close()
    results = []
    for n, runs in segs.items():
        writer_med = statistics.median(g.writer_pairs_s for g in runs)
        raw_med = statistics.median(g.raw_pairs_s for g in runs)
        results.append(
            Result(
                slots=n,
                synchronous=sync,
                clients=clients,
                pairs=per_client * clients * repeat,
                writer_pairs_s=writer_med,
                raw_pairs_s=raw_med,
                ratio=writer_med / raw_med,
                raw_1cmd_pairs_s=statistics.median(g.raw_1cmd_pairs_s for g in runs),
                avg_batch=statistics.fmean(g.avg_batch for g in runs),
                segments=runs,
            )
        )
    return results


@dataclass(frozen=True, slots=True)
class ReservedResult:
    """Enter+exit pairs/s in a lot with future reservations next to the same lot without; `reserve` commands/s."""

    slots: int
    reservations: int
    slots_booked: int
    synchronous: str
    clients: int
    reserve_s: float
    plain_pairs_s: float
    reserved_pairs_s: float
    ratio: float


async def _reserver(w: Writer, client: int, count: int, clients: int, base: float) -> None:
    for n in range(count):
        i = n * clients + client
        # Starts spread over a week from two days ahead (no hold begins while measuring), 1 to 4 hours long.
        start = base + 2 * 86400 + (i * 7919 % (7 * 96)) * 900
        end = start + 3600 * (1 + i % 4)
        r = await w.submit(Reserve(reservation_id=f"r{i}", vehicle=f"R{i:07d}", lot=LOT, start=start, end=end))
        if not r.ok:
            raise RuntimeError(f"reserve r{i}: {r.code} {r.message}")


async def measure_reserved(
    root: Path, slots: int, reservations: int, sync: Synchronous, clients: int, pairs: int, warmup: int, repeat: int
) -> ReservedResult:
    """Fill one lot with `reservations` future reservations (timing `reserve`), then interleave enter+exit
    segments on it and on the same lot without any."""
    writers: list[tuple[Writer, asyncio.Task[None]]] = []
    try:
        for name in ("plain", "reserved"):
            cfg = bench_config(root / f"{name}-{slots}-{sync}", slots)
            w = Writer(db_path(cfg.state_path()), cfg, KEY, synchronous=sync)
            writers.append((w, asyncio.create_task(w.run())))
            await w.wait_ready()
        (plain, _), (booked, _) = writers
        per = reservations // clients
        t0 = time.perf_counter()
        base = time.time()
        await asyncio.gather(*(_reserver(booked, c, per, clients, base) for c in range(clients)))
        reserve_s = per * clients / (time.perf_counter() - t0)
        conn = booked._conn
        assert conn is not None
        slots_booked = conn.execute("SELECT COUNT(DISTINCT slot) FROM reservations").fetchone()[0]
        warm, per_client = max(1, warmup // clients), max(1, pairs // (clients * repeat))
        for w in (plain, booked):
            await writer_segment(w, clients, 0, warm)
        runs: dict[str, list[float]] = {"plain": [], "reserved": []}
        for i in range(repeat):
            for name, w in (("plain", plain), ("reserved", booked)):
                rate, _ = await writer_segment(w, clients, warm + i * per_client, per_client)
                runs[name].append(rate)
    finally:
        for _, task in writers:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    plain_s, reserved_s = statistics.median(runs["plain"]), statistics.median(runs["reserved"])
    return ReservedResult(
        slots, per * clients, slots_booked, sync, clients, reserve_s, plain_s, reserved_s, reserved_s / plain_s
    )


def reserved_table(results: list[ReservedResult]) -> str:
    lines = [
        "| slots | future reservations (slots holding them) | synchronous | reserve/s | pairs/s without"
        " | pairs/s with | with/without |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.slots:,} | {r.reservations:,} ({r.slots_booked:,}) | {r.synchronous} | {r.reserve_s:,.0f}"
            f" | {r.plain_pairs_s:,.0f} | {r.reserved_pairs_s:,.0f} | {r.ratio:.0%} |"
        )
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    lines = [
        "| slots | synchronous | writer pairs/s | raw pairs/s (same batching) | writer/raw | raw pairs/s (1 cmd/txn)"
        " | avg batch (cmds/commit) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.slots:,} | {r.synchronous} | {r.writer_pairs_s:,.0f} | {r.raw_pairs_s:,.0f} | {r.ratio:.0%}"
            f" | {r.raw_1cmd_pairs_s:,.0f} | {r.avg_batch:.1f} |"
        )
    return "\n".join(lines)


def scaling(results: list[Result]) -> str:
    """Writer pairs/s at each size relative to the smallest size, per synchronous mode."""
    out = []
    for sync in dict.fromkeys(r.synchronous for r in results):
        rows = sorted((r for r in results if r.synchronous == sync), key=lambda r: r.slots)
        if len(rows) > 1:
            base = rows[0]
            out += [
                f"{sync}: {r.slots:,} slots at {r.writer_pairs_s / base.writer_pairs_s:.0%} of {base.slots:,}"
                for r in rows[1:]
            ]
    return "\n".join(out)


def _int_list(text: str) -> list[int]:
    return [int(x.replace("_", "").replace("k", "000")) for x in text.split(",") if x]


def _sync_list(text: str) -> list[Synchronous]:
    modes: dict[str, Synchronous] = {"FULL": "FULL", "NORMAL": "NORMAL"}
    bad = [x for x in text.upper().split(",") if x not in modes]
    if bad:
        raise argparse.ArgumentTypeError(f"synchronous must be FULL or NORMAL, not {bad[0]!r}")
    return [modes[x] for x in text.upper().split(",")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.allocation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=_int_list, default=[1000, 10000, 100000], help="lot sizes (1000,10000,100000)")
    ap.add_argument("--sync", type=_sync_list, default=["FULL", "NORMAL"], help="synchronous modes (FULL,NORMAL)")
    ap.add_argument("--pairs", type=int, default=9000, help="measured enter+exit pairs per path (9000)")
    ap.add_argument("--warmup", type=int, default=640, help="pairs before measuring (640)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved measured segments per path (3)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients on the writer path (64)")
    ap.add_argument(
        "--reservations",
        type=int,
        default=10000,
        help="the reservations row: this many future reservations in a lot of --reservation-slots (10000; 0: skip)",
    )
    ap.add_argument("--reservation-slots", type=int, default=10000, help="the reservations row's lot size (10000)")
    ap.add_argument("--quick", action="store_true", help="smoke check: 1000 slots, few pairs")
    ap.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON ('-': stdout)")
    ap.add_argument("--dir", type=Path, help="where the stores go (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.quick:
        args.slots, args.pairs, args.warmup, args.repeat = [1000], 400, 64, 2
        args.reservations, args.reservation_slots = 640, 1000
    if min(args.clients, args.pairs, args.repeat) < 1:
        ap.error("--clients, --pairs and --repeat must be positive")

    with tempfile.TemporaryDirectory(prefix="bench-alloc-", dir=args.dir) as tmp:
        root = Path(tmp)
        statements = asyncio.run(check_same_sql(root))
        print(
            f"baseline check: one enter + one exit run the same {statements} statements on both paths", file=sys.stderr
        )
        load_before = os.getloadavg()
        results: list[Result] = []
        for sync in args.sync:
            results += asyncio.run(measure(root, args.slots, sync, args.clients, args.pairs, args.warmup, args.repeat))
            for r in results[-len(args.slots) :]:
                print(
                    f"{r.slots:>7,} {sync:<6} writer {r.writer_pairs_s:8,.0f}  raw {r.raw_pairs_s:8,.0f}"
                    f"  raw1 {r.raw_1cmd_pairs_s:8,.0f}  batch {r.avg_batch:5.1f}",
                    file=sys.stderr,
                )
        reserved: list[ReservedResult] = []
        if args.reservations > 0:
            for sync in args.sync:
                rr = asyncio.run(
                    measure_reserved(
                        root, args.reservation_slots, args.reservations, sync, args.clients, args.pairs,
                        args.warmup, args.repeat,
                    )
                )  # fmt: skip
                reserved.append(rr)
                print(
                    f"{rr.slots:>7,} {sync:<6} reserve {rr.reserve_s:8,.0f}/s  pairs without {rr.plain_pairs_s:8,.0f}"
                    f"  with {rr.reserved_pairs_s:8,.0f} ({rr.ratio:.0%})",
                    file=sys.stderr,
                )
        load_after = os.getloadavg()
    print(
        f"{args.clients} clients; {results[0].pairs} measured pairs per path in {args.repeat} interleaved segments"
        f" (medians), after {args.warmup} warm-up pairs; Python {platform.python_version()},"
        f" SQLite {sqlite3.sqlite_version}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
    )
    print(table(results))
    if len(args.slots) > 1:
        print("\n" + scaling(results))
    if reserved:
        print("\n" + reserved_table(reserved))
    if args.json is not None:
        meta = {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "nproc": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "repeat": args.repeat,
        }
        doc = json.dumps(
            {"run": meta, "results": [asdict(r) for r in results], "reserved": [asdict(r) for r in reserved]}, indent=2
        )
        if str(args.json) == "-":
            print(doc)
        else:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(doc + "\n")


if __name__ == "__main__":
    main()
