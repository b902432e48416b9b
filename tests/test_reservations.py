"""Reservations, fees and payment end to end: requests and camera reads over the embedded broker, on a ManualClock.

Each test runs a gateway whose clock the test moves: holds, no-shows, hours and grace windows pass in
milliseconds, and the deadlines service fires them as it does in production.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import parse_config
from gateway.core.clock import ManualClock, iso_ms
from gateway.store.audit import audit
from tests.conftest import free_port
from tests.harness import Observer, R, observer, running
from tests.helpers import reader

FRIDAY_2000_BERLIN = 1796410800.0  # 2026-12-04 20:00 Europe/Berlin (UTC+1)
MONDAY_0730_BERLIN = 1796625000.0  # 2026-12-07 07:30 Europe/Berlin
HOUR = 3600.0


def config(state_dir: Path, port: int, *, policy: str = "deny", tariff: str = "", timezone: str = "UTC") -> Any:
    tariff = tariff or "free_minutes = 15\nper_hour = 250\ndaily_cap = 2000"
    # The test's anonymous client is device, operator and pay station at once.
    acl = state_dir.parent / "anonymous.acl"
    acl.parent.mkdir(parents=True, exist_ok=True)
    acl.write_text("topic readwrite #\n")
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{state_dir}"
timezone = "{timezone}"
[broker]
embedded = true
port = {port}
allow_anonymous = true
acl_file = "{acl}"
[timing]
reread_window = 30
hold_ahead = 1800
no_show_after = 1200
[policy]
exit_unpaid = "{policy}"
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-004" }}]
  [[lots.zones]]
  id = "B"
  slots = [{{ ids = "B-001", type = "ev" }}]
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
camera = "cam-in1"
[[gates]]
id = "out1"
lot = "lot1"
direction = "exit"
camera = "cam-out1"
[[tariffs]]
lot = "lot1"
currency = "EUR"
exit_grace_minutes = 10
{tariff}
"""
    )


@dataclass
class Site:
    obs: Observer
    clock: ManualClock
    cfg: Any

    async def req(self, verb: str, **body: Any) -> dict[str, Any]:
        return await self.obs.request(verb, body)

    async def ok(self, verb: str, **body: Any) -> dict[str, Any]:
        reply = await self.req(verb, **body)
        assert reply["status"] == "ok", reply
        data: dict[str, Any] = reply["data"]
        return data

    async def error(self, verb: str, **body: Any) -> dict[str, Any]:
        reply = await self.req(verb, **body)
        assert reply["status"] == "error", reply
        err: dict[str, Any] = reply["error"]
        return err

    def at(self, offset: float) -> str:
        """An RFC 3339 time `offset` seconds from now, with a +01:00 offset as a client in Berlin sends it."""
        return iso_ms(self.clock.wall() + offset + HOUR).replace("Z", "+01:00")

    async def reserve(self, rid: str, vehicle: str, start: float, end: float, **kw: Any) -> dict[str, Any]:
        return await self.req("reserve", reservation_id=rid, vehicle=vehicle, lot="lot1", start=self.at(start),
                              end=self.at(end), **kw)  # fmt: skip

    def events(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        return self.obs.events(type_, **match)

    async def wait_event(self, type_: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        return await self.obs.wait_event(type_, count, **match)

    async def slot_status(self, slot: str, status: str) -> None:
        await self.obs.wait_for(lambda: (self.obs.state(f"{R}/slots/{slot}") or {}).get("status") == status)

    async def counts(self) -> dict[str, Any]:
        return await self.ok("availability", lot="lot1")

    async def read(self, camera: str, plate: str) -> None:
        await self.obs.pub(f"cameras/{camera}/reads", {"event_id": uuid.uuid4().hex, "plate": plate})

    async def advance(self, seconds: float) -> None:
        """Move the clock; deadlines now due fire (the caller waits for what they cause)."""
        self.clock.advance(seconds)


@contextlib.asynccontextmanager
async def site(tmp_path: Path, *, start: float = 1_800_000_000.0, **kw: Any) -> AsyncIterator[Site]:
    port = free_port()
    cfg = config(tmp_path / "state", port, **kw)
    clock = ManualClock(wall=start)
    async with running(cfg, clock=clock), observer(port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        yield Site(obs, clock, cfg)
    conn = reader(cfg)
    try:
        assert audit(conn) == []
    finally:
        conn.close()


async def test_hold_arrival_full_overlap_and_no_show(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        # Overlapping reservations get distinct slots; the one too many is refused full.
        replies = [await s.reserve(f"r{i}", f"RES{i}", 2 * HOUR, 4 * HOUR) for i in range(5)]
        assert [r["status"] for r in replies] == ["ok"] * 4 + ["error"]
        assert replies[4]["error"]["code"] == "full"
        held = {r["data"]["slot"] for r in replies[:4]}
        assert held == {"A-001", "A-002", "A-003", "A-004"}
        assert len(s.events("reservation.created")) == 4
        # Back to back on [start, end): a reservation ending when r0 starts shares its slot.
        before = await s.reserve("r-early", "EARLY1", HOUR, 2 * HOUR)
        assert before["status"] == "ok" and before["data"]["slot"] in held
        # Before the hold: the slots are available.
        c = await s.counts()
        assert (c["available"], c["reserved"]) == (5, 0)
        # The hold begins at start - hold_ahead (r-early: its own start - 30 min, at +30 min).
        await s.advance(0.5 * HOUR)
        await s.slot_status(before["data"]["slot"], "reserved")
        c = await s.counts()
        assert (c["available"], c["reserved"]) == (4, 1)
        # ... and for r0..r3 at +1.5 h, except r-early's slot, whose hold waits for r-early's end at +2 h.
        await s.advance(HOUR)
        await s.obs.wait_for(lambda: len(s.events("slot.status", status="reserved")) >= 4)
        c = await s.counts()
        assert (c["available"], c["reserved"]) == (1, 4)
        # A walk-in is denied full while the last free standard slot is held (ev is restricted).
        denied = await s.error("enter", vehicle="WALK1", lot="lot1")
        assert denied["code"] == "full"
        # The reserved vehicle at the entry camera gets its slot.
        await s.read("cam-in1", "RES1")
        (arrived,) = await s.wait_event("reservation.arrived")
        (started,) = await s.wait_event("session.started", reservation_id="r1")
        assert arrived["slot"] == started["slot"] == replies[1]["data"]["slot"]
        arrived_seq = arrived["seq"]
        assert arrived_seq < started["seq"]
        # r-early never came: released at its start + no_show_after (+1 h + 20 min); r0 at +2 h + 20 min.
        await s.advance(0.5 * HOUR - 60)  # +2 h - 1 min: r-early's no-show (at +1 h 20) has fired
        (gone,) = await s.wait_event("reservation.no_show", reservation_id="r-early")
        assert s.events("reservation.no_show", reservation_id="r0") == []
        await s.advance(20 * 60 - 1)
        assert s.events("reservation.no_show", reservation_id="r0") == []
        await s.advance(61)
        await s.wait_event("reservation.no_show", reservation_id="r0")
        await s.slot_status(replies[0]["data"]["slot"], "available")
        assert gone["slot"] == before["data"]["slot"]


async def test_reserve_is_idempotent_by_id_and_cancel_frees_the_hold(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        first = await s.reserve("r1", "AB123CD", 600, 2 * HOUR)  # held at once: start - hold_ahead has passed
        assert first["status"] == "ok"
        slot = first["data"]["slot"]
        await s.slot_status(slot, "reserved")
        # The same id and fields: the first answer, whatever happened since; other fields: conflict.
        again = await s.req("reserve", reservation_id="r1", vehicle="ab 123 cd", lot="lot1",
                            start=iso_ms(s.clock.wall() + 600), end=iso_ms(s.clock.wall() + 2 * HOUR))  # fmt: skip
        assert again["data"] == first["data"]
        other = await s.reserve("r1", "AB123CD", 600, 3 * HOUR)
        assert other["error"]["code"] == "conflict"
        # Bad times are refused with a reason.
        for start, end in ((HOUR, HOUR), (-3 * HOUR, -HOUR)):
            assert (await s.reserve("bad", "XY1", start, end))["error"]["code"] == "invalid_request"
        naive = await s.req("reserve", reservation_id="bad", vehicle="XY1", lot="lot1",
                            start="2030-01-01T10:00:00", end="2030-01-01T11:00:00")  # fmt: skip
        assert naive["error"]["code"] == "invalid_request" and "offset" in naive["error"]["message"]
        assert (await s.ok("cancel_reservation", reservation_id="r1")) == {}
        await s.wait_event("reservation.cancelled", reservation_id="r1")
        await s.slot_status(slot, "available")
        assert (await s.ok("cancel_reservation", reservation_id="r1")) == {}
        await s.ok("availability", lot="lot1")  # a later request: the second cancel has committed
        assert len(s.events("reservation.cancelled")) == 1
        assert (await s.reserve("r1", "AB123CD", 600, 2 * HOUR))["data"] == first["data"]


async def test_a_walk_in_in_the_reserved_slot_moves_the_reservation_or_puts_it_at_risk(tmp_path: Path) -> None:
    async with site(tmp_path) as s:
        # Walk-ins prefer slots with no reservation ahead: A-001 (reserved for later) is taken last.
        r = await s.reserve("r1", "RES1", 3 * HOUR, 4 * HOUR)
        assert r["data"]["slot"] == "A-001"
        walk = [await s.ok("enter", vehicle=f"WALK{i}", lot="lot1") for i in range(4)]
        assert [w["slot"] for w in walk] == ["A-002", "A-003", "A-004", "A-001"]
        await s.ok("exit", vehicle="WALK0")  # within the free minutes
        # At the hold, WALK3 is still in A-001: the reservation moves to the free A-002.
        await s.advance(2.5 * HOUR)
        (moved,) = await s.wait_event("reservation.moved", reservation_id="r1")
        assert moved["slot"] == "A-002"
        await s.slot_status("A-002", "reserved")
        # Nothing free when the next hold begins: alert reservation.at_risk, the reservation keeps its slot.
        r2 = await s.reserve("r2", "RES2", HOUR, 2 * HOUR)  # overlaps r1: not A-002; A-001 is free of reservations
        assert r2["data"]["slot"] == "A-001"
        await s.advance(0.5 * HOUR)
        (risk,) = await s.wait_event("alert", code="reservation.at_risk")
        assert risk["subject"] == {"reservation": "r2", "slot": "A-001"}
        await s.slot_status("A-001", "occupied")  # the walk-in is still there; reserved once it leaves
        walk3 = walk[3]["session_id"]
        await s.ok("pay", session_id=walk3, amount=(await s.ok("quote", session_id=walk3))["due"], payment_ref="w3")
        await s.ok("exit", vehicle="WALK3")
        await s.slot_status("A-001", "reserved")


async def test_quote_short_payment_payment_and_grace_under_deny(tmp_path: Path) -> None:
    async with site(tmp_path, policy="deny") as s:
        await s.read("cam-in1", "AB123CD")
        (started,) = await s.wait_event("session.started")
        sid = started["session_id"]
        await s.advance(55 * 60)
        quote = await s.ok("quote", session_id=sid)
        assert quote == {"session_id": sid, "amount": 250, "currency": "EUR", "paid": 0, "due": 250,
                         "paid_until": None}  # fmt: skip
        assert await s.ok("quote", vehicle="ab-123-cd", lot="lot1") == quote
        # deny: the exit is refused with what is due, the session stays active (the car is still inside).
        refused = await s.error("exit", vehicle="AB123CD", gate="out1")
        assert refused == {"code": "payment_required", "message": "250 EUR due", "due": 250, "currency": "EUR"}
        await s.read("cam-out1", "AB123CD")  # the camera's read: refused too (and remembered as a re-read)
        short = await s.error("pay", session_id=sid, amount=200, payment_ref="pos-1")
        assert (short["code"], short["due"], short["currency"]) == ("payment_required", 250, "EUR")
        assert (await s.ok("quote", session_id=sid))["paid"] == 0  # recorded nothing
        assert s.events("session.ended") == []
        paid = await s.ok("pay", session_id=sid, amount=250, payment_ref="pos-2")
        assert paid == {"paid_until": iso_ms(s.clock.wall() + 600)}
        (confirmed,) = await s.wait_event("payment.confirmed")
        assert confirmed["payment_ref"] == "pos-2" and confirmed["idempotency_key"] == sid
        assert confirmed["amount"] == 250
        assert await s.ok("pay", session_id=sid, amount=250, payment_ref="pos-2") == paid  # same ref, same answer
        assert len(s.events("payment.confirmed")) == 1
        # The second hour starts during the grace (at 60 min): the exit still opens with nothing more due. The
        # camera re-read (same plate, same gate, within reread_window) is a new decision after the payment.
        await s.advance(8 * 60)
        q = await s.ok("quote", session_id=sid)
        assert (q["amount"], q["paid"], q["due"], q["paid_until"]) == (250, 250, 0, paid["paid_until"])
        await s.read("cam-out1", "A8123CD")
        (ended,) = await s.wait_event("session.ended")
        assert ended["fee"] == {"amount": 250, "currency": "EUR"} and ended["gate"] == "out1"
        assert ended["duration_s"] == 63 * 60
        assert s.events("payment.requested") == []

        # Past the grace, what accrued since is due again.
        second = await s.ok("enter", vehicle="CD456EF", lot="lot1")
        await s.advance(30 * 60)
        await s.ok("pay", session_id=second["session_id"], amount=250, payment_ref="pos-3")
        await s.advance(11 * 60)  # past the grace, still in the first hour: nothing more
        assert (await s.ok("quote", session_id=second["session_id"]))["due"] == 0
        await s.advance(20 * 60)  # the second hour: due again
        q = await s.ok("quote", session_id=second["session_id"])
        assert (q["amount"], q["paid"], q["due"]) == (500, 250, 250)
        again = await s.error("exit", session_id=second["session_id"])
        assert (again["code"], again["due"]) == ("payment_required", 250)


async def test_bill_later_opens_and_requests_payment(tmp_path: Path) -> None:
    async with site(tmp_path, policy="bill_later") as s:
        entered = await s.ok("enter", vehicle="AB123CD", lot="lot1")
        await s.advance(50 * 60)
        await s.ok("pay", session_id=entered["session_id"], amount=250, payment_ref="p1")
        await s.advance(11 * 60)  # past the grace: the second hour is due
        out = await s.ok("exit", vehicle="AB123CD")
        assert out["fee"] == {"amount": 500, "currency": "EUR"} and out["duration_s"] == 3660
        (requested,) = await s.wait_event("payment.requested")
        assert requested["amount"] == 250 and requested["idempotency_key"] == entered["session_id"]
        assert requested["currency"] == "EUR"
        (ended,) = await s.wait_event("session.ended")
        assert ended["fee"]["amount"] == 500 and ended["seq"] < requested["seq"]
        await s.slot_status(entered["slot"], "available")


async def test_occupancy_factor_is_taken_at_entry(tmp_path: Path) -> None:
    bands = (
        "free_minutes = 0\nper_hour = 250\n"
        "occupancy_multipliers = [{ from = 0.0, factor = 1.0 }, { from = 0.6, factor = 1.5 }]"
    )
    async with site(tmp_path, tariff=bands) as s:
        # 5 slots: the 4th entry sees 3/5 = 0.6 occupied (exactly the band's from), the 3rd 2/5.
        sessions = [await s.ok("enter", vehicle=f"CAR{i}", lot="lot1", type=t)
                    for i, t in enumerate(("standard", "standard", "ev", "standard"))]  # fmt: skip
        await s.advance(10 * 60)
        amounts = [(await s.ok("quote", session_id=x["session_id"]))["amount"] for x in sessions]
        assert amounts == [250, 250, 250, 375]
        # The factor stays with the session whatever the lot does later.
        for x in sessions[:3]:
            await s.ok("pay", session_id=x["session_id"], amount=250, payment_ref=x["session_id"])
            await s.ok("exit", session_id=x["session_id"])
        assert (await s.ok("quote", session_id=sessions[3]["session_id"]))["amount"] == 375


async def test_period_rate_across_an_hour_boundary(tmp_path: Path) -> None:
    peak = (
        "free_minutes = 0\nper_hour = 250\n"
        'periods = [{ days = "mon-fri", from = "08:00", to = "19:00", per_hour = 300 }]'
    )
    async with site(tmp_path, tariff=peak, timezone="Europe/Berlin", start=MONDAY_0730_BERLIN) as s:
        entered = await s.ok("enter", vehicle="AB123CD", lot="lot1")
        await s.advance(HOUR)  # 08:30: only the first hour (from 07:30, off-peak) has started
        assert (await s.ok("quote", session_id=entered["session_id"]))["amount"] == 250
        await s.advance(1)  # the second hour starts 08:30, in the peak period
        assert (await s.ok("quote", session_id=entered["session_id"]))["amount"] == 550


async def test_daily_cap_across_midnight_in_the_configured_timezone(tmp_path: Path) -> None:
    night = (
        "free_minutes = 0\nper_hour = 250\ndaily_cap = 2000\n"
        'periods = [{ days = "mon-sun", from = "22:00", to = "06:00", per_hour = 100 }]'
    )
    async with site(tmp_path, tariff=night, timezone="Europe/Berlin", start=FRIDAY_2000_BERLIN) as s:
        entered = await s.ok("enter", vehicle="AB123CD", lot="lot1")
        sid = entered["session_id"]
        # Friday 20:00 to Saturday 06:00 Berlin: 20, 21 at 250, 22..05 at the night rate (in UTC it would be 1450).
        await s.advance(10 * HOUR)
        assert (await s.ok("quote", session_id=sid))["amount"] == 2 * 250 + 8 * 100
        # 26 h: the first 24 h block (4,800 by the hour) is capped at 2,000; the next block has 20:00 and 21:00.
        await s.advance(16 * HOUR)
        assert (await s.ok("quote", session_id=sid))["amount"] == 2000 + 500
        refused = await s.error("exit", session_id=sid)
        assert refused["due"] == 2500
