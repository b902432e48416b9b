"""The single writer: one task, one connection, one queue; group commit with a savepoint per command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.core import exits, lanes, outbox, reconcile, reservations, slots, timers, upkeep
from gateway.core.clock import SYSTEM_CLOCK, Clock, Timeline
from gateway.core.domain import (
    BatteryReport,
    Block,
    CancelReservation,
    Command,
    CommandError,
    CompactOutbox,
    Enter,
    Exit,
    FireDue,
    ForgetEvents,
    GateAction,
    GateActuated,
    GateAlert,
    GateEvent,
    GateState,
    Housekeeping,
    OpenGate,
    Pay,
    Ping,
    RaiseAlert,
    Rearm,
    RecordRejections,
    Reply,
    Reserve,
    SensorChanges,
    SensorsSeen,
    SetGateMode,
    Unblock,
)
from gateway.core.events import Envelope
from gateway.core.plates import PlateKey
from gateway.core.txn import Txn
from gateway.store.schema import Synchronous, connect, migrate
from gateway.store.settings import settings_from_config
from gateway.store.state import private_store
from gateway.store.sync import sync_config, sync_gates

log = structlog.get_logger("gateway.writer")

Handler = Callable[[Txn, Any], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Committed:
    """What one group commit changed, handed to listeners after COMMIT (replies, MQTT, actuations)."""

    events: list[Envelope]
    batch_size: int
    # The earliest (timer, wall) deadline after this commit when the commit changed deadlines, else None.
    next_due: tuple[float | None, float | None] | None = None
    # What the barriers are to do now that it is committed, in decision order (gateway/core/lanes.py).
    actions: list[GateAction] = field(default_factory=list)


Applied = tuple[list[Reply], list[Envelope], tuple[float | None, float | None] | None, list[GateAction]]


class WriterClosed(Exception):
    pass


# Retrying a group commit that failed for a passing reason (guarantee 8): capped exponential backoff.
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 2.0
RETRY_LOG_EVERY_S = 10.0
# SQLite's primary result codes that a later attempt can get past: the database busy or locked by another
# connection, an I/O error or a full disk (freed later), memory. Anything else is a bug or a broken file.
PASSING = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_PROTOCOL,
}


def passing(exc: sqlite3.Error) -> bool:
    """A failure that a later attempt may not meet (busy, locked, I/O, full)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in PASSING


class _Passing(Exception):
    """A group commit failed for a passing reason and was rolled back: try the batch again."""


@dataclass(slots=True, eq=False)
class _Entry:
    cmd: Command
    fut: asyncio.Future[Reply]
    give_up_at: float | None  # monotonic; None: retried until it commits (device input, upkeep)
    urgent: bool = False


HANDLERS: dict[type[Command], Handler] = {
    Enter: lanes.enter,  # allocation.enter, and at a barrier gate its OPEN
    Exit: lanes.exit_,  # exits.exit_, likewise
    Block: slots.block,
    Unblock: slots.unblock,
    SensorChanges: reconcile.sensor_changes,
    SensorsSeen: reconcile.sensors_seen,
    BatteryReport: reconcile.battery_report,
    Rearm: reconcile.rearm,
    RecordRejections: upkeep.record_rejections,
    Housekeeping: upkeep.housekeeping,
    RaiseAlert: upkeep.raise_alert,
    FireDue: timers.fire_due,
    Reserve: reservations.reserve,
    CancelReservation: reservations.cancel,
    Pay: exits.pay,
    Ping: upkeep.ping,
    ForgetEvents: outbox.forget,
    CompactOutbox: outbox.compact,
    GateEvent: lanes.gate_event,
    OpenGate: lanes.open_gate,
    SetGateMode: lanes.set_gate_mode,
    GateActuated: lanes.actuated,
    GateState: lanes.gate_state,
    GateAlert: lanes.gate_alert,
}


class Writer:
    """Owns the store's only writing connection. Submit commands; replies resolve after their COMMIT."""

    def __init__(
        self,
        db_path: Path,
        config: GatewayConfig,
        key: PlateKey,
        *,
        synchronous: Synchronous | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._path = db_path
        self._config = config
        self._settings = settings_from_config(config)
        self._key = key
        self._sync: Synchronous = synchronous or config.store.synchronous
        self._batch_max = config.store.group_commit_max
        self._clock = clock
        self.timeline = Timeline(clock)
        # The earliest (timer, wall) deadline in the store; listeners learn of changes through Committed.
        self.next_due: tuple[float | None, float | None] = (None, None)
        self.name = "writer"
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue(maxsize=10_000)
        # The priority lane: interactive decisions (a car at a barrier) commit before anything queued.
        self._urgent: deque[_Entry] = deque()
        # The unapplied rest of a batch that made way for urgent work: it goes before the queue, in its order.
        self._carry: deque[_Entry] = deque()
        self._work = asyncio.Event()
        # Monotonic time until which no batch without urgent commands starts (expect_urgent).
        self._expect_until = 0.0
        self._listeners: list[Callable[[Committed], None]] = []
        self._ready = asyncio.Event()
        self._closed = False
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._next_seq = 1
        self.commits = 0
        self.commands = 0
        self.commit_failures = 0
        self._failing_since: float | None = None
        self._last_failure_log = 0.0

    def add_listener(self, listener: Callable[[Committed], None]) -> None:
        """Called in the event loop after every COMMIT, in commit order. Must not block."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Committed], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._urgent) + len(self._carry)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def submit(self, cmd: Command, *, give_up_after: float | None = None, urgent: bool = False) -> Reply:
        """Apply `cmd`; the reply resolves after its COMMIT.

        A commit that fails for a passing reason is retried until it succeeds; with `give_up_after` the command
        is answered `unavailable` instead once it could not be committed for that long (it then never commits).
        `urgent` (a decision a car waits for at a barrier): it goes in the next group commit, ahead of everything
        queued, with other urgent commands only (unbounded: their rate is that of cars). A group commit under way
        when it arrives stops after the command it is applying, applies the urgent ones after it and commits that
        much, so that they need no fsync of their own; the rest comes after it.
        """
        if self._closed:
            raise WriterClosed("the writer has stopped")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        give_up_at = None if give_up_after is None else self._clock.monotonic() + give_up_after
        entry = _Entry(cmd, fut, give_up_at, urgent)
        if urgent:
            self._urgent.append(entry)
        else:
            await self._queue.put(entry)
        self._work.set()
        return await fut

    def expect_urgent(self, within: float) -> None:
        """An urgent command is about to come (a car drove onto a barrier's loop, its read follows): start no
        other group commit for up to `within` seconds, or until an urgent one has committed.

        An urgent command that arrives while a batch commits waits for that commit's work and fsync, the largest
        part of a decision's time under sensor traffic (bench/README.md, Lane); the queue waits a moment instead.
        """
        self._expect_until = max(self._expect_until, self._clock.monotonic() + within)

    async def start(self) -> None:
        """Open the store: migrate, sync the config, load the event sequence."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
        self._ready.set()

    async def run(self) -> None:
        """Apply queued commands in group commits until cancelled; then stop."""
        try:
            await self.start()
            while True:
                while not self._urgent and not self._carry and self._queue.empty():
                    self._work.clear()
                    await self._work.wait()
                held = self._expect_until - self._clock.monotonic()
                if not self._urgent and held > 0:
                    self._work.clear()
                    await self._clock.wait(self._work, held)  # an urgent submit (or any) wakes it to look again
                    continue
                batch: list[_Entry] = []
                self._top_up(batch)
                await self._commit(batch)
        finally:
            await self.stop()

    def _top_up(self, batch: list[_Entry]) -> None:
        """Urgent commands first; a batch with any of them takes no others, so that its commit stays short."""
        urgent = self._urgent
        while urgent and len(batch) < self._batch_max:
            batch.append(urgent.popleft())
        if any(e.urgent for e in batch):
            return
        carry = self._carry
        while carry and len(batch) < self._batch_max:
            batch.append(carry.popleft())
        while len(batch) < self._batch_max and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _commit(self, batch: list[_Entry]) -> None:
        """Commit `batch`, retrying a passing failure with capped backoff; commands queued meanwhile join it."""
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST_S
        try:
            while batch:
                # Only a batch without urgent commands makes way for them (one with them holds nothing else).
                yields = not any(e.urgent for e in batch)
                joined: list[_Entry] = []  # urgent entries the thread took into this commit (yields only)
                work = loop.run_in_executor(self._executor, self._apply, [e.cmd for e in batch], yields, joined)
                try:
                    try:
                        done = await asyncio.shield(work)
                    except asyncio.CancelledError:
                        # The batch runs to its end in the thread: deliver what it committed, then stop.
                        with contextlib.suppress(_Passing):
                            done = await work
                            batch = self._deliver(_joined(batch, joined, done), *done)
                        raise
                except _Passing as exc:
                    self._urgent.extendleft(reversed(joined))  # rolled back with the batch: first again
                    self._failed(exc, len(batch))
                    batch = self._give_up(batch)
                    await self._clock.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    self._top_up(batch)
                    continue
                if not yields or joined:
                    self._expect_until = 0.0  # what was expected has come
                # What the batch did not apply (it made way for urgent work) goes first once that is committed.
                self._carry.extendleft(reversed(self._deliver(_joined(batch, joined, done), *done)))
                batch = []
                self._recovered()
                return
        finally:
            for entry in batch:  # cancelled while retrying: not committed, failed like the queue in stop()
                if not entry.fut.done():
                    entry.fut.set_exception(WriterClosed("the gateway stopped before committing this"))

    def _failed(self, exc: _Passing, size: int) -> None:
        now = self._clock.monotonic()
        self.commit_failures += 1
        if self._failing_since is None:
            self._failing_since = now
            self._last_failure_log = now
            log.warning("group commit failed, retrying", error=str(exc.__cause__ or exc), batch=size)
        elif now - self._last_failure_log >= RETRY_LOG_EVERY_S:
            self._last_failure_log = now
            log.error(
                "the store still cannot commit, retrying",
                error=str(exc.__cause__ or exc),
                batch=size,
                failing_s=round(now - self._failing_since, 1),
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.info("group commit recovered", after_s=round(self._clock.monotonic() - self._failing_since, 1))
            self._failing_since = None

    def _give_up(self, batch: list[_Entry]) -> list[_Entry]:
        """Answer `unavailable` to the commands past their patience (never attempted again); keep the rest."""
        now = self._clock.monotonic()
        keep: list[_Entry] = []
        for entry in batch:
            if entry.fut.done():
                continue  # the caller went away
            if entry.give_up_at is not None and now >= entry.give_up_at:
                entry.fut.set_result(Reply.error("unavailable", "the store could not commit; try again"))
            else:
                keep.append(entry)
        return keep

    async def stop(self) -> None:
        """Refuse new commands, fail the queued ones with WriterClosed, close the store; safe to call twice.

        WriterClosed, not a reply: the caller must know that nothing was committed (a device message it
        raised is then not acknowledged, and the broker delivers it again after the restart).
        """
        self._closed = True
        while self._urgent or self._carry or not self._queue.empty():
            lane = self._urgent if self._urgent else self._carry if self._carry else None
            fut = (lane.popleft() if lane is not None else self._queue.get_nowait()).fut
            if not fut.done():
                fut.set_exception(WriterClosed("the gateway stopped before committing this"))
        executor, self._executor = self._executor, None
        if executor is not None:
            if self._conn is not None:
                await asyncio.get_running_loop().run_in_executor(executor, self._conn.close)
                self._conn = None
            executor.shutdown(wait=True)

    async def health(self) -> dict[str, Any]:
        failing = None if self._failing_since is None else round(self._clock.monotonic() - self._failing_since, 1)
        return {
            "queue_depth": self.queue_depth,
            "commits": self.commits,
            "commands": self.commands,
            "commit_failures": self.commit_failures,
            "failing_s": failing,
        }

    def _deliver(
        self,
        batch: list[_Entry],
        replies: list[Reply],
        events: list[Envelope],
        next_due: tuple[float | None, float | None] | None,
        actions: list[GateAction],
    ) -> list[_Entry]:
        """Answer the commands the commit applied (the first len(replies)) and tell the listeners; the rest."""
        applied, rest = batch[: len(replies)], batch[len(replies) :]
        for entry, reply in zip(applied, replies, strict=True):
            if not entry.fut.done():
                entry.fut.set_result(reply)
        self.commits += 1
        self.commands += len(applied)
        if next_due is not None:
            self.next_due = next_due
        if events or next_due is not None or actions:
            done = Committed(events, len(applied), next_due, actions)
            for listener in self._listeners:
                try:
                    listener(done)
                except Exception:
                    log.exception("commit listener failed")
        return rest

    # --- below runs in the writer thread only ---

    def _open(self) -> None:
        private_store(self._path)
        conn = connect(self._path, synchronous=self._sync)
        # 1 MiB of page cache, not SQLite's 2: at 100,000 slots the allocation probes measured the same
        # (bench/allocation.py, 2,121 against 1,962 pairs/s under load), and at 10,000 it is 1.1 MiB of RSS.
        conn.execute("PRAGMA cache_size=-1024")
        migrate(conn)
        lots = {lot.id: lot.name for lot in self._config.lots}
        sync_config(conn, lots, self._config.slot_specs(), self._clock.wall())
        sync_gates(conn, [g.id for g in self._config.gates if g.serial is not None])
        self._conn = conn
        self._next_seq = self._load_seq()
        (reply,), _, _, _ = self._apply([Rearm()])
        if not reply.ok:
            raise RuntimeError(f"re-arming the deadlines failed: {reply.message}")
        self.next_due = timers.next_due(self._txn(conn))

    def _load_seq(self) -> int:
        assert self._conn is not None
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])

    def _txn(self, conn: sqlite3.Connection) -> Txn:
        return Txn(conn, self._settings, self._key, self._clock.wall(), self._next_seq, self.timeline.now())

    def _apply(self, cmds: list[Command], yields: bool = False, joined: list[_Entry] | None = None) -> Applied:
        """One group commit of `cmds`, or with `yields` of as many as were applied before urgent work came (at
        least one) and then of that urgent work, taken into `joined`: replies for those only, in that order."""
        conn = self._conn
        assert conn is not None
        txn = self._txn(conn)
        replies: list[Reply] = []
        next_due = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for cmd in cmds:
                # Read across threads without a lock: a deque's length is atomic, and a car seen one command
                # late costs one command's time.
                if yields and replies and self._urgent:
                    break
                replies.append(self._apply_one(txn, cmd))
            # Urgent work that came while this batch ran joins its COMMIT rather than wait for it and its own.
            # Taken here, while the loop waits for this batch: nobody else pops the lane meanwhile.
            while yields and joined is not None and self._urgent and len(joined) < self._batch_max:
                entry = self._urgent.popleft()
                joined.append(entry)
                replies.append(self._apply_one(txn, entry.cmd))
            if txn.next_seq != self._next_seq:  # a batch without events (a Ping) writes nothing at all
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (str(txn.next_seq),))
            outbox.account(conn, len(txn.events), sum(len(e.body) for e in txn.events))
            if txn.deadlines_changed:
                next_due = timers.next_due(txn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                self._next_seq = self._load_seq()
            if passing(exc):
                raise _Passing(str(exc)) from exc
            log.error("group commit failed", error=str(exc), batch=len(cmds))
            failed = Reply.error("unavailable", "the store could not commit; try again")
            # All of them, also those it did not get to.
            return [failed] * (len(cmds) + len(joined or ())), [], None, []
        self._next_seq = txn.next_seq
        return replies, txn.events, next_due, txn.actions

    def _apply_one(self, txn: Txn, cmd: Command) -> Reply:
        conn = txn.conn
        mark = (txn.next_seq, len(txn.events), len(txn.actions))
        conn.execute("SAVEPOINT cmd")
        try:
            keys = self._keys(cmd)
            reply = self._replay(txn, keys, verb_of(cmd))
            if reply is None:
                try:
                    reply = Reply(True, HANDLERS[type(cmd)](txn, cmd))
                except CommandError as exc:
                    if not exc.keep_effects:
                        self._undo(txn, mark)
                    reply = Reply.error(exc.code, exc.message, **exc.extra)
                self._remember(txn, keys, reply, verb_of(cmd))
            conn.execute("RELEASE cmd")
            return reply
        except sqlite3.IntegrityError as exc:
            # The unique fences caught what the allocation logic should have prevented: refuse, keep neighbours.
            self._undo(txn, mark)
            conn.execute("RELEASE cmd")
            log.error("constraint refused a command", command=type(cmd).__name__, error=str(exc))
            return Reply.error("conflict", "refused by a store constraint")
        except sqlite3.Error as exc:
            if passing(exc):
                raise  # the whole group commit is retried
            self._undo(txn, mark)
            conn.execute("RELEASE cmd")
            log.exception("command failed in the store", command=type(cmd).__name__)
            return Reply.error("unavailable", f"store error: {exc.sqlite_errorname}")
        except Exception as exc:
            self._undo(txn, mark)
            conn.execute("RELEASE cmd")
            log.exception("command failed", command=type(cmd).__name__)
            return Reply.error("unavailable", f"internal error: {type(exc).__name__}")

    @staticmethod
    def _undo(txn: Txn, mark: tuple[int, int, int]) -> None:
        txn.conn.execute("ROLLBACK TO cmd")
        txn.next_seq = mark[0]
        del txn.events[mark[1] :]
        del txn.actions[mark[2] :]

    def _keys(self, cmd: Command) -> list[tuple[str, float]]:
        """The command's idempotency keys with how long each is honoured."""
        keys: list[tuple[str, float]] = []
        if cmd.idempotency_key is not None:
            keys.append((cmd.idempotency_key, self._settings.idempotency_ttl))
        reread = getattr(cmd, "reread_key", None)
        if reread is not None:
            keys.append((reread, self._settings.reread_window))
        return keys

    @staticmethod
    def _replay(txn: Txn, keys: list[tuple[str, float]], verb: str) -> Reply | None:
        """The stored reply for a repeated transaction, camera event, or re-read within the window.

        A transaction belongs to the verb that first used it: another verb gets `conflict` and changes nothing.
        """
        for key, ttl in keys:
            row = txn.conn.execute("SELECT reply, created_at FROM idempotency WHERE key = ?", (key,)).fetchone()
            if row is not None and row[1] >= txn.now - ttl:
                doc = json.loads(row[0])
                used_by = doc.get("verb")  # absent in rows of releases before 0.2: any verb replays them
                if used_by is not None and used_by != verb:
                    return Reply.error("conflict", f"this transaction belongs to an earlier {used_by!r} request")
                return Reply.from_json(doc)
        return None

    @staticmethod
    def _remember(txn: Txn, keys: list[tuple[str, float]], reply: Reply, verb: str) -> None:
        if not keys:
            return
        body = json.dumps({**reply.to_json(), "verb": verb}, separators=(",", ":"))
        for key, _ in keys:
            txn.conn.execute(
                "INSERT INTO idempotency (key, reply, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET reply = excluded.reply, created_at = excluded.created_at",
                (key, body, txn.now),
            )


def _joined(batch: list[_Entry], joined: list[_Entry], done: Applied) -> list[_Entry]:
    """`batch` with the urgent entries its commit took in after its applied part: in the order of the replies."""
    if not joined:
        return batch
    applied = len(done[0]) - len(joined)
    return [*batch[:applied], *joined, *batch[applied:]]


def verb_of(cmd: Command) -> str:
    """The verb an idempotency key is stored with: the command's kind (`CancelReservation` -> `cancel_reservation`,
    as its request)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(cmd).__name__).lower()
