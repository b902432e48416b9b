"""Guarantees 1 and 2 and the gapless seq, as properties over random interleavings against the real writer."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gateway.core.domain import Block, Command, Enter, Exit, Reply, Unblock
from gateway.store.audit import audit
from gateway.store.availability import availability
from gateway.store.writer import Committed
from tests.helpers import EVENTS_SCHEMA, lot_config, new_writer, reader

VEHICLES = [f"CAR{i:02d}" for i in range(14)]
SLOTS = [f"A-{i:03d}" for i in range(1, 7)] + ["A-900", "A-901"]
TRANSACTIONS = [f"t{i}" for i in range(5)]

vehicles = st.sampled_from(VEHICLES)
slots = st.sampled_from(SLOTS)
maybe_tx = st.none() | st.sampled_from(TRANSACTIONS).map(lambda t: f"tx:{t}")
enters = st.builds(
    Enter,
    vehicle=vehicles,
    lot=st.just("lot1"),
    zone=st.none() | st.sampled_from(["A", "B"]),
    type=st.none() | st.sampled_from(["standard", "ev"]),
    idempotency_key=maybe_tx,
)
exits = st.builds(Exit, vehicle=vehicles, idempotency_key=maybe_tx)
blocks = st.builds(Block, slot=slots, reason=st.just("maintenance"), idempotency_key=maybe_tx)
unblocks = st.builds(Unblock, slot=slots, idempotency_key=maybe_tx)
commands = st.one_of(enters, exits, blocks, unblocks)


class WriterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-prop-"))
        self.cfg = lot_config(
            self.dir,
            slots=6,
            synchronous="NORMAL",
            extra=('  [[lots.zones]]\n  id = "B"\n  slots = [{ ids = "A-900..A-901", type = "ev" }]\n'),
        )
        self.writer = new_writer(self.cfg)
        self.task = self.loop.create_task(self.writer.run())
        self.loop.run_until_complete(self.writer.wait_ready())
        self.seen_seq = 0
        self.gaps: list[str] = []
        self.writer.add_listener(self._on_commit)
        self.replies: dict[str, tuple[type[Command], Reply]] = {}
        self.conn = reader(self.cfg)

    def _on_commit(self, done: Committed) -> None:
        for event in done.events:
            if event.seq != self.seen_seq + 1:
                self.gaps.append(f"live seq {event.seq} after {self.seen_seq}")
            self.seen_seq = event.seq
            # What leaves the gateway is what the exported schema promises integrators.
            body = json.loads(event.body)
            assert body == event.to_json()
            EVENTS_SCHEMA.validate(body)

    def _submit(self, cmds: list[Command]) -> list[Reply]:
        async def go() -> list[Reply]:
            return list(await asyncio.gather(*(self.writer.submit(c) for c in cmds)))

        return self.loop.run_until_complete(go())

    def _check_transaction(self, cmd: Command, reply: Reply) -> None:
        """The same transaction gets the same answer from its verb, and `conflict` from any other."""
        assert cmd.idempotency_key is not None
        first = self.replies.setdefault(cmd.idempotency_key, (type(cmd), reply))
        if first[0] is type(cmd):
            assert reply == first[1], "a repeated transaction got a different answer"
        else:
            assert reply.code == "conflict", f"a transaction reused by another verb got {reply}"

    def _check_reply(self, cmd: Command, reply: Reply) -> None:
        if cmd.idempotency_key is not None:
            self._check_transaction(cmd, reply)
            return
        if isinstance(cmd, Enter) and reply.code == "full":
            # Only full when nothing of an admissible type is free in the requested zone.
            sql = "SELECT COUNT(*) FROM slots WHERE lot = 'lot1' AND status = 'available'"
            args: list[Any] = []
            if cmd.zone is not None:
                sql += " AND zone = ?"
                args.append(cmd.zone)
            sql += " AND type = ?"
            args.append(cmd.type or "standard")
            assert self.conn.execute(sql, args).fetchone()[0] == 0, f"full while a slot was free: {cmd}"
        if isinstance(cmd, Enter) and reply.ok:
            row = self.conn.execute(
                "SELECT slot FROM sessions WHERE id = ? AND state = 'active'", (reply.data["session_id"],)
            ).fetchone()
            assert row is not None and row[0] == reply.data["slot"]

    @initialize()
    def start(self) -> None:
        pass

    @rule(cmd=commands)
    def one(self, cmd: Command) -> None:
        (reply,) = self._submit([cmd])
        self._check_reply(cmd, reply)

    @rule(batch=st.lists(commands, min_size=2, max_size=12))
    def burst(self, batch: list[Command]) -> None:
        # Submitted together: the writer group-commits them, one savepoint each.
        # Later commands of the batch may have changed what an earlier reply saw, so only the repeated
        # transactions are checked per reply here; the invariants check the whole state after it.
        replies = self._submit(batch)
        for cmd, reply in zip(batch, replies, strict=True):
            if cmd.idempotency_key is not None:
                self._check_transaction(cmd, reply)

    @invariant()
    def invariants_hold(self) -> None:
        assert audit(self.conn) == []
        assert self.gaps == []
        doc = availability(self.conn, "lot1")
        active_on_slots = self.conn.execute(
            "SELECT COUNT(*) FROM sessions WHERE state = 'active' AND slot IS NOT NULL"
        ).fetchone()[0]
        assert doc["occupied"] == active_on_slots
        assert doc["total"] == doc["available"] + doc["occupied"] + doc["reserved"] + doc["blocked"]
        blocked_free = self.conn.execute(
            "SELECT COUNT(*) FROM slots t WHERE blocked = 1"
            " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.slot = t.id AND s.state = 'active')"
        ).fetchone()[0]
        assert doc["blocked"] == blocked_free
        next_seq = int(self.conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
        assert next_seq == self.seen_seq + 1

    def teardown(self) -> None:
        self.conn.close()
        self.task.cancel()
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


WriterMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestWriterMachine = WriterMachine.TestCase
