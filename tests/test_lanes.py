"""Barrier lanes end to end: simulated GCP/1 controllers on real ptys, cameras and requests over MQTT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.store.status import render_text, status_document
from simulators.barrier import BarrierState, wire
from tests.gcp1_helpers import until
from tests.harness import R
from tests.helpers import reader
from tests.lanes_rig import HOUR, Lanes, lanes


async def test_entry_opens_after_commit_shows_the_slot_and_is_confirmed_by_the_pass(tmp_path: Path) -> None:
    async with lanes(tmp_path) as s:
        s.entry.vehicle_arrives()
        await s.obs.wait_for(lambda: (s.gate_state("in1") or {}).get("vehicle_present") is True)
        await until(lambda: s.entry.display_text == "WELCOME")
        before = len(s.entry.commands)
        await s.read("cam-in1", "AB123CD")
        (started,) = await s.wait_event("session.started")
        (opened,) = await s.wait_event("gate.opened")
        assert opened["gate"] == "in1" and opened["reason"] == "entry" and opened["session_id"] == started["session_id"]
        assert opened["actor"] is None and opened["note"] is None
        await until(lambda: s.entry.display_text == started["slot"])
        sent = [c.cmd for c in s.entry.commands[before:] if c.cmd in (wire.OPEN, wire.DISPLAY)]
        assert sent[:2] == [wire.OPEN, wire.DISPLAY]
        await until(lambda: s.entry.barrier == BarrierState.OPEN)
        assert s.events("session.confirmed") == []
        await s.entry.vehicle_passes()
        (confirmed,) = await s.wait_event("session.confirmed")
        assert confirmed == {**confirmed, "session_id": started["session_id"], "gate": "in1"}
        await until(lambda: s.entry.barrier == BarrierState.CLOSED)
        await s.obs.wait_for(lambda: (s.gate_state("in1") or {}).get("barrier") == "closed")
        state = s.gate_state("in1") or {}
        assert state == {**state, "mode": "normal", "vehicle_present": False}
        assert [c for c in s.entry.commands if c.cmd == wire.CLOSE] == []


async def test_a_full_lot_keeps_the_barrier_closed_and_the_sign_says_full(tmp_path: Path) -> None:
    async with lanes(tmp_path, slots=2) as s:
        await s.enter("AB123CD")
        await s.enter("CD456EF")
        # Between cars the sign says FULL while no slot is left for a walk-in (A-EV1 is restricted) ...
        await until(lambda: s.entry.barrier == BarrierState.CLOSED)
        s.clock.advance(11)  # the last car's slot stays on the sign for 10 s
        await until(lambda: s.entry.display_text == "FULL")
        # ... and the next car is refused: the barrier stays closed, the sign says it again.
        opens, before = len(s.executed(s.entry, wire.OPEN)), len(s.entry.commands)
        await s.arrive_and_read(s.entry, "cam-in1", "EF789GH")
        (denied,) = await s.wait_event("entry.denied")
        assert denied["reason"] == "full" and denied["gate"] == "in1"
        await until(lambda: any(c.cmd == wire.DISPLAY and c.payload == b"FULL" for c in s.entry.commands[before:]))
        assert len(s.executed(s.entry, wire.OPEN)) == opens and s.entry.barrier == BarrierState.CLOSED
        s.entry.vehicle_backs_out()  # nobody waits for this car: nothing to cancel
        await until(lambda: not s.entry.unacked)
        assert s.events("session.cancelled") == []
        # A slot comes free: the sign greets again.
        await s.request("exit", vehicle="AB123CD")
        await until(lambda: s.entry.display_text == "WELCOME")


async def test_no_pass_within_pass_timeout_cancels_the_entry_and_a_barrier_held_open_raises_an_alert(
    tmp_path: Path,
) -> None:
    async with lanes(tmp_path, pass_timeout=30) as s:
        await s.arrive_and_read(s.entry, "cam-in1", "AB123CD")
        (started,) = await s.wait_event("session.started")
        await until(lambda: s.entry.barrier == BarrierState.OPEN)
        # The gateway knows it is open (its open-too-long count starts there) before the clock moves.
        await s.obs.wait_for(lambda: (s.obs.state(f"{R}/gates/in1") or {}).get("barrier") == "open")
        s.clock.advance(29)
        await s.request("availability", lot="lot1")  # a round trip through the gateway: nothing fired early
        assert s.events("session.cancelled") == []
        s.clock.advance(1)
        (cancelled,) = await s.wait_event("session.cancelled")
        assert cancelled == {**cancelled, "session_id": started["session_id"], "reason": "pass_timeout"}
        assert cancelled["slot"] == started["slot"]
        await s.obs.wait_for(lambda: (s.obs.state(f"{R}/slots/{started['slot']}") or {}).get("status") == "available")
        # The car still sits on the loop, so the controller holds the barrier open: past 120 s that is an alert.
        s.clock.advance(91)
        (alert,) = await s.wait_event("alert", code="gate.open_too_long")
        assert alert["subject"] == {"gate": "in1"} and alert["severity"] == "warning"
        # It passes after all: no session waits for it any more, nothing is confirmed.
        await s.entry.vehicle_passes()
        await until(lambda: not s.entry.unacked)
        assert s.events("session.confirmed") == []


async def test_a_back_out_cancels_the_entry_and_closes_the_barrier_once_the_loops_are_clear(tmp_path: Path) -> None:
    async with lanes(tmp_path) as s:
        await s.arrive_and_read(s.entry, "cam-in1", "AB123CD")
        (started,) = await s.wait_event("session.started")
        await until(lambda: s.entry.barrier == BarrierState.OPEN)
        s.entry.vehicle_backs_out()
        (cancelled,) = await s.wait_event("session.cancelled")
        assert cancelled["reason"] == "backed_out" and cancelled["session_id"] == started["session_id"]
        await until(lambda: bool(s.executed(s.entry, wire.CLOSE)))
        (close,) = s.executed(s.entry, wire.CLOSE)
        assert not close.loop_a and not close.loop_b and close.result == wire.OK
        await until(lambda: s.entry.barrier == BarrierState.CLOSED)
        await s.obs.wait_for(lambda: (s.obs.state(f"{R}/slots/{started['slot']}") or {}).get("status") == "available")
        # The same plate again is a new entry (the cancelled session is gone, not active).
        await s.enter("AB123CD")


def status(s: Lanes) -> dict[str, Any]:
    conn = reader(s.cfg)
    try:
        return status_document(conn, now=s.clock.wall())
    finally:
        conn.close()


def stored_gates(s: Lanes) -> list[dict[str, Any]]:
    gates: list[dict[str, Any]] = status(s)["gates"]
    return gates


async def _exit_lane_closed(s: Lanes) -> None:
    await until(lambda: s.exit.barrier == BarrierState.CLOSED and not s.exit.loop_a)


async def test_an_unpaid_exit_under_deny_stays_closed_showing_what_is_due_and_opens_once_paid(tmp_path: Path) -> None:
    async with lanes(tmp_path, policy="deny") as s:
        started = await s.enter("AB123CD")
        s.clock.advance(2 * HOUR)  # two started hours
        await s.arrive_and_read(s.exit, "cam-out1", "AB123CD")
        await until(lambda: s.exit.display_text == "PAY 5.00 EUR")
        assert s.executed(s.exit, wire.OPEN) == [] and s.events("session.ended") == []
        assert s.exit.barrier == BarrierState.CLOSED
        # The driver pays at the pay station; the next read is a new decision and the barrier opens.
        quote = await s.request("quote", session_id=started["session_id"])
        assert quote["data"]["due"] == 500
        paid = await s.request("pay", session_id=started["session_id"], amount=500, payment_ref="pos-1")
        assert paid["status"] == "ok"
        await s.read("cam-out1", "AB123CD")
        (ended,) = await s.wait_event("session.ended")
        assert ended["fee"] == {"amount": 500, "currency": "EUR"} and ended["gate"] == "out1"
        (opened,) = await s.wait_event("gate.opened", gate="out1")
        assert opened["reason"] == "exit" and opened["session_id"] == started["session_id"]
        assert opened["seq"] > ended["seq"]
        await until(lambda: s.exit.barrier == BarrierState.OPEN and s.exit.display_text == "THANK YOU")
        await s.exit.vehicle_passes()
        await _exit_lane_closed(s)
        assert s.events("payment.requested") == []


async def test_an_unpaid_exit_under_bill_later_opens_and_requests_payment(tmp_path: Path) -> None:
    async with lanes(tmp_path, policy="bill_later") as s:
        started = await s.enter("AB123CD")
        s.clock.advance(HOUR + 60)  # into the second hour
        await s.arrive_and_read(s.exit, "cam-out1", "AB123CD")
        (requested,) = await s.wait_event("payment.requested")
        assert requested["amount"] == 500 and requested["idempotency_key"] == started["session_id"]
        (opened,) = await s.wait_event("gate.opened", gate="out1")
        assert opened["seq"] > requested["seq"]
        await until(lambda: s.exit.barrier == BarrierState.OPEN)
        await s.exit.vehicle_passes()


async def test_fuzzy_plate_at_exit_repeated_reads_and_an_unmatched_exit(tmp_path: Path) -> None:
    async with lanes(tmp_path) as s:
        s.entry.vehicle_arrives()
        # The camera reads the car three times: the same event again, and the plate misread (B as 8).
        await s.obs.pub("cameras/cam-in1/reads", {"event_id": "e1", "plate": "AB123CD"})
        await s.obs.pub("cameras/cam-in1/reads", {"event_id": "e1", "plate": "AB123CD"})
        await s.obs.pub("cameras/cam-in1/reads", {"event_id": "e2", "plate": "A8123CD"})
        await s.request("availability", lot="lot1")  # after the reads: all three are decided
        await until(lambda: s.entry.barrier == BarrierState.OPEN)
        assert len(s.events("session.started")) == 1 and len(s.events("gate.opened")) == 1
        assert len(s.executed(s.entry, wire.OPEN)) == 1
        await s.entry.vehicle_passes()
        await s.wait_event("session.confirmed")
        # At the exit the camera misreads 0 for D: confusion-merged, unique, so the barrier opens.
        await s.arrive_and_read(s.exit, "cam-out1", "AB123C0")
        (ended,) = await s.wait_event("session.ended")
        await until(lambda: s.exit.barrier == BarrierState.OPEN)
        await s.exit.vehicle_passes()
        await _exit_lane_closed(s)
        # A plate nobody entered with: exit.unmatched, the barrier stays closed and the sign says so.
        opens = len(s.executed(s.exit, wire.OPEN))
        await s.arrive_and_read(s.exit, "cam-out1", "ZZ999ZZ")
        (unmatched,) = await s.wait_event("exit.unmatched")
        assert unmatched["gate"] == "out1"
        await until(lambda: s.exit.display_text == "SEE ATTENDANT")
        assert len(s.executed(s.exit, wire.OPEN)) == opens
        assert ended["fee"]["amount"] == 0


async def test_manual_opens_modes_and_a_forced_open(tmp_path: Path) -> None:
    async with lanes(tmp_path) as s:
        reply = await s.request("open_gate", gate="out1", reason="taxi without a ticket", actor="op-anna")
        assert reply["status"] == "ok"
        (opened,) = await s.wait_event("gate.opened", gate="out1")
        assert opened == {**opened, "reason": "manual", "actor": "op-anna", "note": "taxi without a ticket"}
        assert opened["session_id"] is None
        await until(lambda: len(s.executed(s.exit, wire.OPEN)) == 1)
        # Home Assistant's button: every message is one open.
        await s.obs.pub(f"{R}/gates/in1/open", "open")
        (ha,) = await s.wait_event("gate.opened", gate="in1")
        assert (ha["actor"], ha["reason"], ha["note"]) == ("homeassistant", "manual", None)
        bad = await s.request("open_gate", gate="nope", reason="", actor="op")
        assert bad["error"]["code"] == "invalid_request"
        # Locked closed: the controller is told, entries at that gate are refused and the sign says CLOSED.
        await until(lambda: s.entry.barrier == BarrierState.CLOSED)
        assert (await s.request("set_gate_mode", gate="in1", mode="locked_closed"))["status"] == "ok"
        (mode,) = await s.wait_event("gate.mode")
        assert mode == {**mode, "gate": "in1", "mode": "locked_closed", "actor": None}
        await s.obs.wait_for(lambda: (s.gate_state("in1") or {}).get("mode") == "locked_closed")
        await s.arrive_and_read(s.entry, "cam-in1", "AB123CD")
        await until(lambda: s.entry.display_text == "CLOSED")
        assert s.events("session.started") == []
        refused = await s.request("open_gate", gate="in1", reason="x", actor="op")
        assert refused["error"]["code"] == "conflict"
        s.entry.vehicle_backs_out()
        await s.request("set_gate_mode", gate="in1", mode="normal", actor="op-anna")
        await s.wait_event("gate.mode", mode="normal", actor="op-anna")
        await until(lambda: s.entry.mode == 0)
        # Somebody lifts the arm by hand.
        s.entry.force_open()
        (alert,) = await s.wait_event("alert", code="gate.forced_open")
        assert alert["subject"] == {"gate": "in1"} and alert["severity"] == "warning"
        assert len(s.events("gate.opened", gate="in1")) == 1  # not an open the gateway commanded


async def test_controller_unplugged_and_replugged_loses_no_event_and_applies_none_twice(tmp_path: Path) -> None:
    async with lanes(tmp_path) as s:
        await s.arrive_and_read(s.entry, "cam-in1", "AB123CD")
        (started,) = await s.wait_event("session.started")
        await until(lambda: s.entry.barrier == BarrierState.OPEN)
        s.entry.unplug()
        (offline,) = await s.wait_event("alert", code="gate.offline")
        assert offline["subject"] == {"gate": "in1"}
        await s.obs.wait_for(lambda: (s.gate_state("in1") or {}).get("barrier") == "offline")
        s.clock.advance(1)  # what the controller reported reaches the store at most once a second
        gate = await s.obs.wait_for(lambda: next((g for g in stored_gates(s) if g["barrier"] == "offline"), None))
        assert gate == {**gate, "gate": "in1", "barrier": "offline", "mode": "normal", "loop_a": True}
        assert "gate in1: barrier offline, mode normal, loops A-, offline, last STATUS" in render_text(status(s))
        await s.entry.vehicle_passes()  # while the cable is out: PASSED waits in the controller
        s.entry.lose_host_acks(1)  # and the first ACK after the replug is lost: the controller sends it again
        s.entry.replug()
        await s.wait_event("alert", code="gate.online")
        (confirmed,) = await s.wait_event("session.confirmed")
        assert confirmed["session_id"] == started["session_id"]
        passed = next(e for e in s.entry.events if e.code == wire.PASSED)
        link = s.gw.lanes.links[str(s.entry.path)]
        await until(lambda: passed.acked_at is not None and link.stats.duplicate_events >= 1)
        await s.request("availability", lot="lot1")
        assert len(s.events("session.confirmed")) == 1
        assert (await s.wait_event("alert", code="gate.online"))[0]["severity"] == "info"
