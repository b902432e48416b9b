"""Guarantees 1 and 2 and the gapless seq, as properties over random interleavings against the real writer.

The writer runs on a ManualClock: reservations, their holds and releases, payments and their grace windows are
driven by clock advances (deadlines fired by FireDue, as the deadlines service does).
Besides: besides entries, exits and blocks: sensor reports (duplicated, reordered, flapping) through the real tracker,
the clock advancing (debounce, vacate grace, offline, arrival window, due deadlines fired) and the wall clock
as the ingress and the deadlines service would drive them (wall steps: tests/test_reconcile.py).
"""

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

from drivers.observations import SensorObservation
from gateway.core.clock import ManualClock
from gateway.core.domain import (
    BatteryReport,
    Block,
    CancelReservation,
    Command,
    Enter,
    Exit,
    FireDue,
    Pay,
    Reply,
    Reserve,
    SensorChange,
    SensorChanges,
    SensorsSeen,
    Unblock,
)
from gateway.core.exits import charges
from gateway.core.reconcile import offline_pad
from gateway.core.sensors import SensorTracker
from gateway.core.slots import derive_status
from gateway.store.audit import audit
from gateway.store.availability import SENSOR_STATES, availability
from gateway.store.settings import settings_from_config
from gateway.store.writer import Committed
from tests.helpers import EVENTS_SCHEMA, lot_config, new_writer, reader

VEHICLES = [f"CAR{i:02d}" for i in range(14)]
SLOTS = [f"A-{i:03d}" for i in range(1, 7)] + ["A-900", "A-901"]
TRANSACTIONS = [f"t{i}" for i in range(5)]
# Slots with a reporting sensor: the first in fill order (where entries go) and one ev slot; the rest have none.
SENSED = ["A-001", "A-002", "A-003", "A-900"]

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
RESERVATIONS = [f"r{i}" for i in range(8)]
reservation_ids = st.sampled_from(RESERVATIONS)
TARIFF = """
[timing]
hold_ahead = 1800
no_show_after = 1200
[[tariffs]]
lot = "lot1"
currency = "EUR"
free_minutes = 15
per_hour = 250
daily_cap = 2000
exit_grace_minutes = 10
occupancy_multipliers = [ { from = 0.0, factor = 1.0 }, { from = 0.5, factor = 1.25 } ]
"""


class WriterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="pg-prop-"))
        self.cfg = lot_config(
            self.dir,
            slots=6,
            synchronous="NORMAL",
            extra=('  [[lots.zones]]\n  id = "B"\n  slots = [{ ids = "A-900..A-901", type = "ev" }]\n' + TARIFF),
        )
        self.clock = ManualClock()
        self.writer = new_writer(self.cfg, self.clock)
        self.writer_settings = settings_from_config(self.cfg)
        # The ingress's part, driven by hand: the real tracker on the same clock.
        self.tracker = SensorTracker(debounce=5.0, offline_after=900.0)
        self.seq = dict.fromkeys(SLOTS, 0)
        self.task = self.loop.create_task(self.writer.run())
        self.loop.run_until_complete(self.writer.wait_ready())
        self.seen_seq = 0
        self.gaps: list[str] = []
        self.writer.add_listener(self._on_commit)
        self.replies: dict[str, tuple[type[Command], Reply]] = {}
        # reservation_id -> (the fields it was first made with, its first answer)
        self.reserved: dict[str, tuple[Reserve, Reply]] = {}
        self.payments: dict[str, Reply] = {}
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

    def _check_reserve(self, cmd: Reserve, reply: Reply) -> None:
        first = self.reserved.get(cmd.reservation_id)
        if first is not None:
            same = (first[0].vehicle, first[0].start, first[0].end, first[0].type, first[0].zone) == (
                cmd.vehicle, cmd.start, cmd.end, cmd.type, cmd.zone
            )  # fmt: skip
            assert reply == (first[1] if same else Reply.error("conflict", reply.message or "")), (cmd, reply)
        elif reply.ok:
            self.reserved[cmd.reservation_id] = (cmd, reply)

    def _fire(self) -> None:
        while sum(self._submit([FireDue()])[0].data.get("fired", {}).values()):
            pass

    @initialize()
    def start(self) -> None:
        pass

    @rule(
        rid=reservation_ids,
        vehicle=vehicles,
        lead=st.sampled_from([-600, 0, 300, 1800, 2400, 3600, 7200]),
        length=st.sampled_from([900, 1800, 3600, 5400]),
        type_=st.none() | st.just("ev"),
        zone=st.none() | st.sampled_from(["A", "B"]),
    )
    def reserve(self, rid: str, vehicle: str, lead: int, length: int, type_: str | None, zone: str | None) -> None:
        start = self.clock.wall() + lead
        cmd = Reserve(
            reservation_id=rid, vehicle=vehicle, lot="lot1", start=start, end=start + length, type=type_, zone=zone
        )
        (reply,) = self._submit([cmd])
        self._check_reserve(cmd, reply)

    @rule(rid=reservation_ids)
    def cancel(self, rid: str) -> None:
        before = self.conn.execute("SELECT state FROM reservations WHERE id = ?", (rid,)).fetchone()
        (reply,) = self._submit([CancelReservation(reservation_id=rid)])
        if before is not None and before[0] in ("booked", "held", "cancelled"):
            assert reply.ok, reply
            (again,) = self._submit([CancelReservation(reservation_id=rid)])
            assert again == reply

    @rule(data=st.data())
    def arrive(self, data: st.DataObject) -> None:
        live = self.conn.execute(
            "SELECT id, plate FROM reservations WHERE state IN ('booked', 'held') ORDER BY id"
        ).fetchall()
        if not live:
            return
        rid, plate = data.draw(st.sampled_from(live))
        window = self.conn.execute(
            "SELECT start_at - ? <= ? FROM reservations WHERE id = ?", (1800, self.clock.wall(), rid)
        ).fetchone()[0]
        (reply,) = self._submit([Enter(vehicle=plate, lot="lot1")])
        if reply.ok and window and not reply.data.get("existing"):
            row = self.conn.execute("SELECT reservation_id FROM sessions WHERE id = ?", (reply.data["session_id"],))
            assert row.fetchone()[0] is not None, "the reserved vehicle arrived in its window but got no reservation"

    @rule(data=st.data(), delta=st.sampled_from([-1, 0, 100]), ref=st.sampled_from([f"p{i}" for i in range(6)]))
    def pay(self, data: st.DataObject, delta: int, ref: str) -> None:
        active = self.conn.execute("SELECT * FROM sessions WHERE state = 'active' ORDER BY rowid").fetchall()
        if not active:
            return
        session = data.draw(st.sampled_from(active))
        due = charges(self.writer_settings.tariffs["lot1"], session, self.clock.wall()).due
        amount = max(0, due + delta)
        (reply,) = self._submit([Pay(session_id=session["id"], amount=amount, payment_ref=ref)])
        if ref in self.payments:
            assert reply == self.payments[ref]
        elif reply.ok:
            self.payments[ref] = reply
        else:
            assert amount < due and reply.code == "payment_required" and reply.extra == {"due": due, "currency": "EUR"}

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

    @rule(
        slot=st.sampled_from(SENSED),
        occupied=st.booleans(),
        how=st.sampled_from(["next", "next", "next", "duplicate", "late", "reboot"]),
        battery=st.none() | st.sampled_from([3.6, 3.2]),
        then=st.sampled_from([0.0, 5.0, 5.0, 30.0]),
    )
    def report(self, slot: str, occupied: bool, how: str, battery: float | None, then: float) -> None:
        """A sensor message as the ingress sees it: in order, repeated, late (reordered) or after a reboot."""
        if how == "next":
            self.seq[slot] += 1
        elif how == "reboot":
            self.seq[slot] = 0
        seq = self.seq[slot] - 1 if how == "late" and self.seq[slot] > 0 else self.seq[slot]
        self.tracker.observe(SensorObservation(slot, occupied, None, seq, battery, "json"), self.clock.monotonic())
        if battery is not None:
            self._submit([BatteryReport(sensor=slot, volts=battery, threshold=3.3, low=battery < 3.3)])
        if then:
            self.advance(then)

    @rule(seconds=st.sampled_from([1.0, 4.0, 5.0, 30.0, 300.0, 601.0, 900.0, 1800.0, 3600.0]))
    def advance(self, seconds: float) -> None:
        """Time passes: debounced transitions and silences are committed, then every due deadline fires."""
        self.clock.advance(seconds)
        mono = self.clock.monotonic()
        to_wall = self.clock.wall() - mono
        transitions = self.tracker.due(mono)
        changes = [
            SensorChange(t.sensor_id, "occupied" if t.occupied else "vacant", t.at + to_wall) for t in transitions
        ]
        changes += [SensorChange(s, "offline", seen + to_wall) for s, seen in self.tracker.silent(mono)]
        if changes:
            (reply,) = self._submit([SensorChanges(changes=tuple(changes))])
            assert reply.ok
            self.tracker.committed(transitions)
        self._fire()
        # What the ingress learns from the commits: an offline sensor's next report is a transition.
        for sensor in self.conn.execute("SELECT sensor FROM slots WHERE sensor_state = 'offline'"):
            if not self.tracker.is_silent(sensor[0]):
                self.tracker.mark_offline(sensor[0])

    @rule()
    def flush(self) -> None:
        """The ingress's periodic flush of offline deadlines (padded past the memory's)."""
        timeline = self.writer.timeline
        seen = [
            (s, heard, heard + 900.0 + offline_pad(60.0))
            for s in SLOTS
            if (t := self.tracker.last_seen(s)) is not None
            for heard in [timeline.now() - (self.clock.monotonic() - t)]
        ]
        if seen:
            self._submit([SensorsSeen(deadlines=tuple(seen))])

    @invariant()
    def invariants_hold(self) -> None:
        assert audit(self.conn) == []
        assert self.gaps == []
        doc = availability(self.conn, "lot1")
        implied = {"available": 0, "occupied": 0, "reserved": 0, "blocked": 0}
        sensors = dict.fromkeys(SENSOR_STATES, 0)
        for blocked, sensor, has_session, held in self.conn.execute(
            "SELECT t.blocked, t.sensor_state,"
            " EXISTS (SELECT 1 FROM sessions s WHERE s.slot = t.id AND s.state = 'active'),"
            " EXISTS (SELECT 1 FROM reservations r WHERE r.slot = t.id AND r.state = 'held') FROM slots t"
        ):
            implied[derive_status(bool(has_session), bool(blocked), sensor, bool(held))] += 1
            sensors[sensor] += 1
        assert {k: doc[k] for k in implied} == implied
        assert doc["sensors"] == sensors
        assert doc["total"] == sum(implied.values()) == sum(sensors.values())
        active_on_slots = self.conn.execute(
            "SELECT COUNT(*) FROM sessions WHERE state = 'active' AND slot IS NOT NULL"
        ).fetchone()[0]
        assert doc["occupied"] >= active_on_slots
        next_seq = int(self.conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
        assert next_seq == self.seen_seq + 1
        held_free = self.conn.execute(
            "SELECT COUNT(*) FROM slots t WHERE blocked = 0 AND sensor_state != 'occupied'"
            " AND EXISTS (SELECT 1 FROM reservations r WHERE r.slot = t.id AND r.state = 'held')"
            " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.slot = t.id AND s.state = 'active')"
        ).fetchone()[0]
        assert doc["reserved"] == held_free
        overlapping = self.conn.execute(
            "SELECT COUNT(*) FROM reservations r JOIN reservations q ON q.slot = r.slot AND q.id > r.id"
            " AND q.start_at < r.end_at AND r.start_at < q.end_at"
            " WHERE r.state IN ('booked', 'held') AND q.state IN ('booked', 'held')"
        ).fetchone()[0]
        assert overlapping == 0
        # A hold only from its time on; a live reservation is released by its deadline.
        now = self.clock.wall()
        early = self.conn.execute(
            "SELECT COUNT(*) FROM reservations WHERE state = 'held' AND hold_from > ?", (now,)
        ).fetchone()[0]
        assert early == 0
        late = self.conn.execute(
            "SELECT COUNT(*) FROM reservations WHERE state IN ('booked', 'held') AND MIN(end_at, start_at + 1200) < ?",
            (now,),
        ).fetchone()[0]
        assert late == 0

    def teardown(self) -> None:
        self.conn.close()
        self.task.cancel()
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


WriterMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestWriterMachine = WriterMachine.TestCase
