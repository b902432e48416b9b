"""Sensors and sessions (contract §6), one scenario per rule: real MQTT sensor messages (JSON and TTS), a real
broker and store, the gateway on a ManualClock so minutes of parking take milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.core.clock import ManualClock
from gateway.core.reconcile import OFFLINE
from gateway.store.audit import audit
from gateway.store.status import status_document
from tests.conftest import MosquittoProcess
from tests.harness import Observer, R, observer, running
from tests.helpers import reader

TTS_APP = "parking@ttn"


def reconcile_config(
    state_dir: Path, port: int, timing: str = "", zones: str = "", zone_a: str = '{ ids = "A-001..A-004" }'
) -> GatewayConfig:
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{state_dir}"
[broker]
embedded = false
port = {port}
[privacy]
publish_plates = true
[timing]
debounce = 5
arrival_window = 900
vacate_grace = 600
sensor_offline_after = 900
sensor_seen_flush = 60
{timing}
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{zone_a}]
  [[lots.zones]]
  id = "B"
  slots = [{{ ids = "B-001..B-002" }}, {{ ids = "T-001", offline_after = 3600, battery_low = 3.0 }}]
{zones}
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
"""
    )


ZONE_C = '  [[lots.zones]]\n  id = "C"\n  slots = [{ ids = "C-001..C-002" }]'
SLOTS_WITH_C = ("A-001", "A-002", "A-003", "A-004", "B-001", "B-002", "T-001", "C-001", "C-002")
# Zone A with A-001's sensor offline 60 s after it last spoke: a dark free slot within a test's first minutes.
ZONE_A_DARK_001 = '{ ids = "A-001", offline_after = 60 }, { ids = "A-002..A-004" }'


@dataclass
class Site:
    gw: Gateway
    obs: Observer
    clock: ManualClock
    seq: Counter[str] = field(default_factory=Counter)
    reads: int = 0

    def messages(self) -> int:
        return sum(self.gw.ingress.verdicts.values())

    async def sensor(self, slot: str, occupied: bool, *, battery: float | None = None) -> None:
        """One report: TTS for the T-* slots (f_cnt), JSON for the others (seq); waits until the tracker took it."""
        self.seq[slot] += 1
        before = self.messages()
        if slot.startswith("T-"):
            decoded: dict[str, Any] = {"occupied": occupied}
            if battery is not None:
                decoded["battery"] = battery
            payload = {
                "end_device_ids": {"device_id": slot},
                "uplink_message": {"f_cnt": self.seq[slot], "decoded_payload": decoded},
            }
            await self.obs.pub(f"v3/{TTS_APP}/devices/{slot}/up", payload)
        else:
            body: dict[str, Any] = {"occupied": occupied, "seq": self.seq[slot]}
            if battery is not None:
                body["battery"] = battery
            await self.obs.pub(f"sensors/{slot}/state", body)
        await self.obs.wait_for(lambda: self.messages() > before)

    async def settle(self) -> None:
        """Until the gateway is idle: nothing queued for the writer, no deadline due, the availability sent."""
        quiet = 0
        for _ in range(500):
            if quiet >= 3:
                return
            await asyncio.sleep(0.02)
            gw = self.gw
            timer_due = gw.writer.next_due[0]
            busy = (
                gw.ingress._tasks
                or gw.ingress._pending
                or gw.writer.queue_depth
                or (timer_due is not None and timer_due <= gw.writer.timeline.now())
                or gw.publisher._dirty
            )
            quiet = 0 if busy else quiet + 1
        raise AssertionError(
            f"gateway not idle: tasks {len(gw.ingress._tasks)}, pending {len(gw.ingress._pending)},"
            f" queue {gw.writer.queue_depth}, due {timer_due} vs {gw.writer.timeline.now()},"
            f" dirty {gw.publisher._dirty}"
        )

    async def advance(self, seconds: float, step: float = 30.0) -> None:
        """Move the clock in steps, letting the gateway work after each (as time passes for real)."""
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            await self.settle()

    async def enter(self, plate: str) -> dict[str, Any]:
        self.reads += 1
        await self.obs.pub("cameras/cam-in1/reads", {"event_id": f"r{self.reads}", "plate": plate})
        started: dict[str, Any] = await self.obs.wait_for(
            lambda: next((e for e in self.obs.events("session.started") if e["vehicle"] == plate), None)
        )
        await self.settle()
        return started

    async def park(self, plate: str) -> dict[str, Any]:
        """An entry whose car parks in its slot 3 s later (its sensor reports it; the debounce still to run)."""
        started = await self.enter(plate)
        await self.advance(3, step=3)
        await self.sensor(started["slot"], True)
        return started

    async def exit(self, plate: str) -> None:
        self.reads += 1
        await self.obs.pub("cameras/cam-out1/reads", {"event_id": f"r{self.reads}", "plate": plate})
        await self.obs.wait_for(lambda: any(e["vehicle"] == plate for e in self.obs.events("session.ended")))
        await self.settle()

    def alerts(self, code: str) -> list[dict[str, Any]]:
        return [a for a in self.obs.events("alert") if a["code"] == code]

    def moved(self) -> list[tuple[str | None, str | None, str]]:
        return [(e["from_slot"], e["to_slot"], e["reason"]) for e in self.obs.events("session.moved")]

    def slot(self, slot: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.obs.state(f"{R}/slots/{slot}")
        return doc

    def availability(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.obs.state(f"{R}/lots/lot1/availability")
        return doc

    async def published(self, check: Any) -> Any:
        return await self.obs.wait_for(check, timeout=5)


@contextlib.asynccontextmanager
async def site(cfg: GatewayConfig, clock: ManualClock, port: int) -> AsyncIterator[Site]:
    async with running(cfg, clock=clock) as gw, observer(port) as obs:
        # No coalescing (that is tested on its own): each commit's availability goes out without the clock moving.
        gw.publisher._every = 0.0
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        s = Site(gw, obs, clock)
        await s.settle()
        yield s


def check_store(cfg: GatewayConfig) -> None:
    conn = reader(cfg)
    try:
        assert audit(conn) == []
    finally:
        conn.close()


async def test_debounce_counts_a_state_only_once_it_held_json_and_tts(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    clock = ManualClock()
    async with site(cfg, clock, mosquitto.port) as s:
        for slot in ("A-004", "T-001"):
            await s.sensor(slot, False)
        await s.advance(5)
        await s.published(lambda: len(s.obs.events("slot.status")) == 2)
        s.obs.messages.clear()
        for slot in ("A-004", "T-001"):
            await s.sensor(slot, True)
            await s.advance(3)
            await s.sensor(slot, False)  # a flap shorter than the debounce never reaches the store
            await s.advance(10)
        assert s.obs.events("slot.status") == []
        for slot in ("A-004", "T-001"):
            await s.sensor(slot, True)
        await s.advance(4.9, step=4.9)
        assert s.obs.events("slot.status") == []
        await s.advance(0.1)
        statuses = await s.published(lambda: len(s.obs.events("slot.status")) == 2 and s.obs.events("slot.status"))
        assert {(e["slot"], e["status"], e["sensor"]) for e in statuses} == {
            ("A-004", "occupied", "occupied"),
            ("T-001", "occupied", "occupied"),
        }
    check_store(cfg)


async def test_unregistered_occupancy_takes_the_slot_out_and_alerts(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-002", True)
        await s.advance(5)
        alert = await s.published(lambda: s.alerts("slot.unregistered_occupancy"))
        assert alert[0]["subject"] == {"slot": "A-002"} and alert[0]["severity"] == "warning"
        await s.published(lambda: s.availability()["available"] == 6)
        assert s.slot("A-002")["status"] == "occupied" and s.slot("A-002")["session"] is None
        assert s.moved() == []
        # Its car leaving gives the slot back.
        await s.sensor("A-002", False)
        await s.advance(5)
        await s.published(lambda: s.availability()["available"] == 7)
    check_store(cfg)


async def test_a_session_on_its_way_is_reseated_where_the_car_parked(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        first = await s.enter("AAA111")
        assert first["slot"] == "A-001"
        await s.advance(60)
        second = await s.enter("BBB222")
        assert second["slot"] == "A-002"
        # A car in zone B: neither session is of that zone, so the oldest one on its way is the one.
        await s.sensor("B-002", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-001", "B-002", "reseated")]
        assert s.obs.events("session.moved")[0]["session_id"] == first["session_id"]
        await s.published(lambda: s.slot("B-002")["session"] == first["session_id"])
        await s.published(lambda: s.slot("A-001")["status"] == "available" and s.slot("A-001")["session"] is None)
        assert s.alerts("slot.unregistered_occupancy") == []
        # Same zone first: a car in zone B belongs to the zone-B session rather than to the older zone-A one.
        third = await s.obs.request("enter", {"vehicle": "CCC333", "lot": "lot1", "zone": "B"})
        assert third["data"]["slot"] == "B-001"
        await s.advance(60)
        # A-001 is free, but AAA111's car may still be driving there (if the pick was wrong): it comes last.
        fourth = await s.enter("DDD444")
        assert fourth["slot"] == "A-003"
        s.obs.messages.clear()
        await s.sensor("T-001", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("B-001", "T-001", "reseated")]
        # Then the oldest: BBB222 before DDD444.
        await s.sensor("A-004", True)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == ("A-002", "A-004", "reseated")
        # A session seen in its own slot is no longer on its way: when AAA111's car turns up in A-001 after all,
        # its session goes back there and the car in B-002 has no session (DDD444 is seated in A-003).
        await s.sensor("A-003", True)
        await s.advance(5)
        await s.sensor("A-001", True)
        await s.advance(5)
        await s.published(lambda: s.alerts("slot.unregistered_occupancy"))
        assert s.moved()[2:] == [("B-002", "A-001", "reseated")]
        assert s.alerts("slot.unregistered_occupancy")[0]["subject"] == {"slot": "B-002"}
        await s.published(lambda: s.availability()["available"] == 2)  # A-002, B-001
    check_store(cfg)


async def test_a_car_in_the_slot_its_session_was_reseated_from_takes_it_back(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await s.enter("AAA111")
        await s.advance(60)
        bbb = await s.enter("BBB222")
        await s.advance(30)
        await s.sensor("A-003", True)  # BBB222's car, but AAA111 is the oldest on its way
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-001", "A-003", "reseated")]
        # A-001 counts as available, but comes last: AAA111's car may still be driving there.
        await s.published(lambda: s.slot("A-001")["status"] == "available")
        assert (await s.enter("CCC333"))["slot"] == "A-004"
        # It is: AAA111 goes back to A-001, and the car in A-003 is matched again (BBB222, on its way).
        await s.sensor("A-001", True)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 3)
        assert s.moved()[1:] == [("A-003", "A-001", "reseated"), ("A-002", "A-003", "reseated")]
        assert [e["session_id"] for e in s.obs.events("session.moved")[1:]] == [aaa["session_id"], bbb["session_id"]]
        await s.published(lambda: s.slot("A-001")["session"] == aaa["session_id"])
        await s.published(lambda: s.slot("A-003")["session"] == bbb["session_id"])
        await s.published(lambda: s.slot("A-002")["status"] == "available")
        assert s.alerts("slot.unregistered_occupancy") == []
        # But when the car the session was re-seated to has nobody else on the way for it, that pick was right,
        # and a car in the slot it left is a mispark into the freed slot: DDD444's here, not EEE555's there.
        await s.sensor("A-004", True)  # CCC333's car, in its slot
        await s.advance(5)
        eee = await s.enter("EEE555")
        assert eee["slot"] == "B-001"  # A-002 comes last while BBB222's car might still be driving there
        await s.advance(30)
        await s.sensor("B-002", True)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 4)
        assert s.moved()[3] == ("B-001", "B-002", "reseated")
        await s.advance(30)
        ddd = await s.enter("DDD444")
        assert ddd["slot"] == "T-001"
        await s.advance(30)
        await s.sensor("B-001", True)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 5)
        assert s.moved()[4] == ("T-001", "B-001", "reseated")
        assert s.obs.events("session.moved")[4]["session_id"] == ddd["session_id"]
    check_store(cfg)


async def test_a_car_is_matched_first_to_a_session_that_could_have_driven_there(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        for slot in ("A-001", "A-002"):
            await s.sensor(slot, False)
        await s.advance(5)
        aaa = await s.enter("AAA111")  # its sensor never sees the car (parked where a sensor died, say)
        await s.advance(300, step=60)
        bbb = await s.enter("BBB222")
        await s.advance(30)
        # On its way for 330 s (AAA111) or for 30 s (BBB222): beyond drive_time (180 s), the older is no longer
        # the likelier one.
        await s.sensor("B-001", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-002", "B-001", "reseated")]
        assert s.obs.events("session.moved")[0]["session_id"] == bbb["session_id"]
        # A car first seen before a session was confirmed is not that session's car: not CCC333, though on its
        # way for less than drive_time, but AAA111.
        await s.sensor("B-002", True)
        await s.advance(2, step=2)
        await s.enter("CCC333")
        await s.advance(3, step=3)
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == ("A-001", "B-002", "reseated")
        assert s.obs.events("session.moved")[1]["session_id"] == aaa["session_id"]
    check_store(cfg)


async def test_a_car_in_a_third_zone_goes_to_the_likelier_zone_and_is_rechecked(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port, zones=ZONE_C)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        for slot in SLOTS_WITH_C:
            await s.sensor(slot, False)
        await s.advance(5)
        for plate in ("PPP001", "PPP002", "PPP003"):  # A-001..A-003, parked
            await s.park(plate)
        await s.advance(5)
        aaa = await s.enter("AAA111")  # A-004, the last of A
        await s.advance(60)
        await s.park("PPP004")  # B-001
        bbb = await s.enter("BBB222")  # B-002
        await s.advance(1)
        ccc = await s.enter("CCC333")  # T-001: B is full
        assert (aaa["slot"], bbb["slot"], ccc["slot"]) == ("A-004", "B-002", "T-001")
        await s.sensor("A-001", False)  # PPP001 leaves: A has room again
        await s.advance(5)
        await s.exit("PPP001")
        await s.advance(24)
        # A car in C-001, none of the three's zone. AAA111 is the oldest on its way (90 s), but a driver who parks
        # elsewhere mostly stays in a zone with room, and zone B had none and has two cars on their way: one of
        # theirs, which keeps zone A's and B's counts right either way (the oldest rule took AAA111's).
        await s.sensor("C-001", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("B-002", "C-001", "reseated")]
        assert s.obs.events("session.moved")[0]["session_id"] == bbb["session_id"]
        await s.published(lambda: s.availability()["zones"]["B"]["available"] == 1)
        check_store(cfg)
        # AAA111's drive_time (180 s) ends with its car nowhere seen and BBB222's slot still vacant: the car is
        # more likely AAA111's after all (its drive is over, BBB222's may not be). They swap.
        await s.advance(80)
        assert len(s.moved()) == 1  # not before its drive_time ends
        await s.advance(10)
        await s.published(lambda: len(s.moved()) == 3)
        assert s.moved()[1:] == [("C-001", "B-002", "reverted"), ("A-004", "C-001", "reseated")]
        assert [e["session_id"] for e in s.obs.events("session.moved")[1:]] == [bbb["session_id"], aaa["session_id"]]
        await s.published(lambda: s.availability()["zones"]["A"]["available"] == 2)
        await s.published(lambda: s.availability()["zones"]["B"]["available"] == 0)
        # And BBB222's car arriving now is BBB222's: nothing moves.
        await s.sensor("B-002", True)
        await s.advance(5)
        await s.published(lambda: s.slot("B-002")["sensor"] == "occupied")
        assert len(s.moved()) == 3 and s.alerts("slot.unregistered_occupancy") == []
    check_store(cfg)


async def aaa_on_its_way_beside_a_dark_slot(s: Site, sensors: tuple[str, ...]) -> dict[str, Any]:
    """`sensors` report vacant, A-001's then dies (`ZONE_A_DARK_001`), A-002 and A-003 are parked, and AAA111
    enters: A-004, the last healthy slot of A. Returns its session.started."""
    for slot in sensors:
        await s.sensor(slot, False)
    await s.advance(65)
    await s.published(lambda: s.alerts("sensor.offline"))  # A-001's sensor died: zone A has a dark free slot
    for plate in ("PPP002", "PPP003"):
        await s.park(plate)
    await s.advance(5)
    aaa = await s.enter("AAA111")
    assert aaa["slot"] == "A-004"
    return aaa


async def test_no_recheck_swap_when_the_older_sessions_car_may_stand_unseen_in_its_own_zone(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port, zones=ZONE_C, zone_a=ZONE_A_DARK_001)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await aaa_on_its_way_beside_a_dark_slot(s, SLOTS_WITH_C)
        await s.advance(60)
        await s.park("PPP004")  # B-001
        bbb = await s.enter("BBB222")  # B-002
        await s.advance(1)
        ccc = await s.enter("CCC333")  # T-001: B is full
        assert (aaa["slot"], bbb["slot"], ccc["slot"]) == ("A-004", "B-002", "T-001")
        await s.advance(30)
        # As in the test before: a car in C-001 goes to zone B's BBB222.
        await s.sensor("C-001", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("B-002", "C-001", "reseated")]
        # AAA111's drive_time ends with its car nowhere seen; but it may well stand over A-001, whose sensor is
        # dead, which is likelier than a mispark into zone C. No swap.
        await s.advance(150)
        assert s.moved() == [("B-002", "C-001", "reseated")]
    check_store(cfg)


async def test_a_car_given_to_the_older_session_is_rechecked_when_a_younger_ones_drive_ends_too(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port, zones=ZONE_C, zone_a=ZONE_A_DARK_001)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await aaa_on_its_way_beside_a_dark_slot(s, SLOTS_WITH_C)
        await s.advance(60)
        bbb = await s.enter("BBB222")  # B-001
        assert (aaa["slot"], bbb["slot"]) == ("A-004", "B-001")
        await s.advance(30)
        # A car in C-001, a zone neither was sent to, each with room: the older AAA111's (likelier to arrive now).
        await s.sensor("C-001", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-004", "C-001", "reseated")]
        # BBB222's drive_time ends too with its car nowhere seen: one of the two cars stands where no sensor sees
        # it, and of the free slots of A half have a dead sensor, of B none: that car is likelier AAA111's, over
        # A-001, and the one in C-001 BBB222's. They swap.
        await s.advance(130)
        assert len(s.moved()) == 1  # not before BBB222's drive_time ends
        await s.advance(20)
        await s.published(lambda: len(s.moved()) == 3)
        assert s.moved()[1:] == [("C-001", "A-004", "reverted"), ("B-001", "C-001", "reseated")]
        assert [e["session_id"] for e in s.obs.events("session.moved")[1:]] == [aaa["session_id"], bbb["session_id"]]
        await s.published(lambda: s.availability()["zones"]["B"]["available"] == 3)
    check_store(cfg)


async def test_no_recheck_swap_with_a_younger_session_while_another_car_was_found_during_its_drive(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    zone_d = '  [[lots.zones]]\n  id = "D"\n  slots = [{ ids = "D-001..D-003" }]'
    cfg = reconcile_config(tmp_path / "state", mosquitto.port, zones=f"{zone_d}\n{ZONE_C}", zone_a=ZONE_A_DARK_001)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await aaa_on_its_way_beside_a_dark_slot(s, (*SLOTS_WITH_C, "D-001", "D-002", "D-003"))
        for plate in ("PPP004", "PPP005", "PPP006"):  # zone B, full
            await s.park(plate)
        await s.advance(41)
        qqq = await s.enter("QQQ444")  # D-001
        await s.advance(10)
        bbb = await s.enter("BBB222")  # D-002
        assert (aaa["slot"], qqq["slot"], bbb["slot"]) == ("A-004", "D-001", "D-002")
        await s.advance(90)
        # A car in C-001: AAA111's, at the end of its drive (more likely than either of zone D's).
        await s.sensor("C-001", True)
        await s.advance(5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-004", "C-001", "reseated")]
        # A car in D-003: QQQ444's, the older of zone D.
        await s.sensor("D-003", True)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == ("D-001", "D-003", "reseated")
        assert s.obs.events("session.moved")[1]["session_id"] == qqq["session_id"]
        # BBB222's drive ends with its car nowhere seen. Zone A hides a car better than zone D, but the car in
        # D-003 may as well be BBB222's (QQQ444's then unseen): no swap of AAA111's on that.
        await s.advance(120)
        assert len(s.moved()) == 2
    check_store(cfg)


async def test_a_session_whose_own_slot_is_seeing_a_car_arrive_is_not_picked(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.enter("AAA111")
        await s.advance(60)
        bbb = await s.enter("BBB222")
        await s.advance(30)
        # BBB222's car in A-003; 2 s later AAA111's car in A-001, still being debounced when A-003 counts: AAA111,
        # though the oldest on its way, is not the one (it would be taken back 2 s later).
        await s.sensor("A-003", True)
        await s.advance(2, step=2)
        await s.sensor("A-001", True)
        await s.advance(3, step=3)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-002", "A-003", "reseated")]
        assert s.obs.events("session.moved")[0]["session_id"] == bbb["session_id"]
        await s.advance(10)
        await s.published(lambda: s.slot("A-001")["sensor"] == "occupied")
        assert len(s.moved()) == 1 and s.alerts("slot.unregistered_occupancy") == []
    check_store(cfg)


async def test_a_slot_whose_sensor_is_debouncing_a_car_is_not_allocated(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", True)  # a car has just parked in A-001, first in fill order
        await s.advance(2, step=2)
        # Still vacant in the store, but the ingress knows better: AAA111 is not sent there (its car would find
        # A-001 taken, and the car there would be taken for AAA111's).
        assert (await s.enter("AAA111"))["slot"] == "A-002"
        await s.advance(5)
        await s.published(lambda: s.alerts("slot.unregistered_occupancy"))
        assert s.alerts("slot.unregistered_occupancy")[0]["subject"] == {"slot": "A-001"}
        assert s.moved() == []
    check_store(cfg)


async def test_a_car_seen_in_a_slot_as_its_session_passes_the_gate_is_someone_elses(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await s.enter("AAA111")
        await s.advance(60)
        # AAA111's car parks in A-002 the moment BBB222 is at the gate, and the camera read is handled first (a
        # decision goes ahead of sensor traffic): BBB222 gets A-002, and then the report of a car there comes.
        bbb = await s.enter("BBB222")
        assert bbb["slot"] == "A-002"
        await s.sensor("A-002", True)
        await s.advance(5)
        # That car cannot be BBB222's, still at the gate: it is AAA111's; BBB222 runs on without a slot.
        await s.published(lambda: len(s.moved()) == 2)
        assert sorted(s.moved(), key=str) == [("A-001", "A-002", "reseated"), ("A-002", None, "taken")]
        by_session = {e["session_id"]: e["to_slot"] for e in s.obs.events("session.moved")}
        assert by_session == {aaa["session_id"]: "A-002", bbb["session_id"]: None}
        await s.published(lambda: s.slot("A-002")["session"] == aaa["session_id"])
        await s.published(lambda: s.slot("A-001")["status"] == "available")
        # BBB222's car finds its slot taken and parks elsewhere: there it is BBB222's, though it has no slot.
        await s.advance(40)
        await s.sensor("B-001", True)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 3)
        assert s.moved()[2] == (None, "B-001", "reseated")
        assert s.obs.events("session.moved")[2]["session_id"] == bbb["session_id"]
        assert s.alerts("slot.unregistered_occupancy") == []
    check_store(cfg)


async def test_a_reseat_whose_car_is_gone_at_once_is_taken_back(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", False)
        await s.advance(5)
        aaa = await s.enter("AAA111")
        await s.advance(30)
        # A flap in A-003, stretched past the debounce by its late second half: AAA111 is re-seated there...
        await s.sensor("A-003", True)
        await s.advance(5, step=5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-001", "A-003", "reseated")]
        await s.advance(0.5, step=0.5)
        await s.sensor("A-003", False)
        await s.advance(5)
        # ... and back, on its way again, once the car there is gone 5.5 s after it was first seen.
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == ("A-003", "A-001", "reverted")
        await s.published(lambda: s.slot("A-001")["session"] == aaa["session_id"])
        await s.published(lambda: s.slot("A-003")["status"] == "available")
        await s.sensor("A-001", True)  # its car arrives
        await s.advance(5)
        await s.published(lambda: s.slot("A-001")["sensor"] == "occupied")
        # A car that stood longer is not taken back when it leaves: BBB222's session stays where its car was.
        bbb = await s.enter("BBB222")
        assert bbb["slot"] == "A-003"  # a healthy vacant sensor first
        await s.advance(30)
        await s.sensor("A-004", True)
        await s.advance(60)
        await s.sensor("A-004", False)
        await s.advance(5)
        await s.published(lambda: len(s.moved()) == 3)
        await s.advance(60)
        assert s.moved()[2:] == [("A-003", "A-004", "reseated")]
        assert s.slot("A-004")["session"] == bbb["session_id"]
        assert s.alerts("slot.unregistered_occupancy") == [] and s.alerts("session.vacated") == []
    check_store(cfg)


async def test_sessions_seated_crosswise_swap_back_when_one_leaves(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await s.enter("AAA111")
        await s.advance(60)
        await s.enter("BBB222")
        await s.sensor("A-003", True)  # BBB222's car, but AAA111 is the oldest on its way
        await s.advance(5)
        await s.sensor("A-002", True)  # AAA111's car, in BBB222's slot: BBB222 is seated there
        await s.advance(60)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-001", "A-003", "reseated")]
        # BBB222's car leaves A-003 and exits; A-002 still reports AAA111's car: AAA111 swaps back.
        await s.sensor("A-003", False)
        await s.advance(60)
        await s.exit("BBB222")
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == ("A-003", "A-002", "reseated")
        assert s.obs.events("session.moved")[1]["session_id"] == aaa["session_id"]
        await s.published(lambda: s.slot("A-002")["session"] == aaa["session_id"])
        await s.published(lambda: s.slot("A-003")["status"] == "available")
        assert s.alerts("slot.unregistered_occupancy") == [] and s.alerts("session.vacated") == []
    check_store(cfg)


async def test_a_session_whose_slot_is_vacant_for_longer_than_a_drive_swaps_in_for_a_car_left_behind(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        assert (await s.enter("AAA111"))["slot"] == "A-001"
        await s.advance(300)
        bbb = await s.enter("BBB222")  # A-002, confirmed 300 s after AAA111: more than a drive_time apart
        await s.advance(10)
        await s.sensor("A-003", True)  # AAA111's car, taken for BBB222's (on its way for less than drive_time)
        await s.advance(20)
        await s.sensor("A-001", True)  # BBB222's car, in AAA111's slot: AAA111 is seated there
        await s.advance(60)
        await s.published(lambda: s.moved() == [("A-002", "A-003", "reseated")])
        # AAA111's car leaves A-003; AAA111 exits 200 s later (a drive_time and more), A-001 still reports a car.
        await s.sensor("A-003", False)
        await s.advance(200)
        await s.exit("AAA111")
        # A car vacant for that long is on its way to no exit: BBB222's car is the one left behind.
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == ("A-003", "A-001", "reseated")
        assert s.obs.events("session.moved")[1]["session_id"] == bbb["session_id"]
        await s.published(lambda: s.slot("A-003")["status"] == "available")
        assert s.alerts("slot.unregistered_occupancy") == [] and s.alerts("session.vacated") == []
    check_store(cfg)


async def test_a_car_that_moves_to_another_slot_takes_its_session_along(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        aaa = await s.park("AAA111")
        await s.advance(600, step=60)
        await s.sensor("A-001", True)  # a heartbeat
        await s.advance(60)
        # Its car leaves A-001, drives about for longer than a drive_time, and parks in A-003; nobody is on the way.
        await s.sensor("A-001", False)
        await s.advance(200)
        await s.sensor("A-003", True)
        await s.advance(10, step=5)
        await s.published(lambda: s.moved() == [("A-001", "A-003", "reseated")])
        assert s.obs.events("session.moved")[0]["session_id"] == aaa["session_id"]
        await s.published(lambda: s.slot("A-001")["status"] == "available")
        assert s.alerts("slot.unregistered_occupancy") == []
        await s.advance(600, step=60)  # no vacate grace runs on for it
        assert s.alerts("session.vacated") == []
    check_store(cfg)


async def test_a_car_on_its_way_to_the_exit_is_not_swapped_in_for_a_car_left_behind(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.park("AAA111")
        await s.advance(1000, step=60)
        assert (await s.enter("BBB222"))["slot"] == "A-002"
        await s.advance(30)
        await s.sensor("A-002", True)  # a car without a session: taken for BBB222's
        await s.advance(5)
        await s.sensor("B-001", True)  # BBB222's car: nobody left on the way for it
        await s.advance(600, step=60)
        await s.published(lambda: len(s.alerts("slot.unregistered_occupancy")) == 1)
        # AAA111's car leaves for the exit; BBB222's leaves too and exits, while A-002 still reports a car.
        await s.sensor("A-002", True)  # a heartbeat: a live sensor (the store hears of it within sensor_seen_flush)
        await s.advance(60)
        await s.sensor("A-001", False)
        await s.advance(5)
        await s.sensor("B-001", False)
        await s.advance(30)
        await s.exit("BBB222")
        # AAA111, confirmed 1,030 s before BBB222, was no crosswise pick with it: its car is on its way out,
        # its slot stays taken until it has left, and the car in A-002 is nobody's.
        await s.published(lambda: len(s.alerts("slot.unregistered_occupancy")) == 2)
        assert s.alerts("slot.unregistered_occupancy")[1]["subject"] == {"slot": "A-002"}
        assert s.moved() == []
        await s.published(lambda: s.slot("A-001")["status"] == "occupied")
        await s.exit("AAA111")
        await s.published(lambda: s.slot("A-001")["status"] == "available")
        assert s.slot("A-002")["status"] == "occupied" and s.slot("A-002")["session"] is None
    check_store(cfg)


async def test_a_silent_sensor_still_saying_occupied_when_its_car_has_left_is_offline(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.park("AAA111")
        await s.advance(500, step=60)  # and then not a word from A-001's sensor (dead, not yet offline)
        bbb = await s.enter("BBB222")
        await s.advance(30)
        await s.exit("AAA111")
        # A-001's last report is 535 s old (more than half its offline_after) and its car has left without a word
        # from it: the sensor is offline now, not 365 s later, and A-001 is free. Taking BBB222, on its way, for
        # the car it last saw would hold A-001 for a car that is not there.
        await s.published(lambda: s.alerts("sensor.offline"))
        assert s.alerts("sensor.offline")[0]["subject"] == {"slot": "A-001", "sensor": "A-001"}
        await s.published(lambda: s.slot("A-001")["status"] == "available" and s.slot("A-001")["sensor"] == "offline")
        assert s.moved() == [] and s.alerts("slot.unregistered_occupancy") == []
        await s.published(lambda: s.slot("A-002")["session"] == bbb["session_id"])
        await s.advance(400, step=60)
        assert len(s.alerts("sensor.offline")) == 1  # not again when its offline_after runs out
        await s.sensor("A-001", False)  # it speaks again: back
        await s.advance(5)
        await s.published(lambda: s.alerts("sensor.online"))
    check_store(cfg)


async def test_arrival_window_counts_from_confirmation(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        # Slots without sensor evidence ('none'): no vacate countdown, the sessions stay on their way...
        assert (await s.enter("AAA111"))["slot"] == "A-001"
        await s.advance(100, step=100)
        assert (await s.enter("BBB222"))["slot"] == "A-002"
        await s.advance(799, step=799)
        # ... for arrival_window after session.confirmed, judged when the car was first seen (899 s).
        await s.sensor("A-004", True)
        await s.advance(5, step=5)
        await s.published(lambda: s.moved())
        assert s.moved() == [("A-001", "A-004", "reseated")]
        await s.advance(97, step=97)  # 1,001 s after AAA111, 901 s after BBB222
        await s.sensor("A-003", True)
        await s.advance(5)
        await s.published(lambda: s.alerts("slot.unregistered_occupancy"))
        assert len(s.moved()) == 1
    check_store(cfg)


async def test_vacate_grace_releases_the_slot_and_the_session_runs_on(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:

        async def hold(seconds: int, occupied: bool) -> None:
            for _ in range(seconds // 300):  # heartbeats, so that the sensor does not go offline meanwhile
                await s.advance(5, step=5)  # the debounce of the report before
                await s.advance(295, step=295)
                await s.sensor("A-001", occupied)

        await s.sensor("A-001", False)
        await s.advance(5)
        started = await s.enter("AAA111")
        assert started["slot"] == "A-001"
        await s.advance(3, step=3)
        await s.sensor("A-001", True)
        await s.advance(5)
        await hold(3600, True)
        # The car pulls out and comes back within the grace: nothing happens.
        await s.sensor("A-001", False)
        await hold(300, False)
        await s.sensor("A-001", True)
        await hold(900, True)
        assert s.alerts("session.vacated") == [] and s.moved() == []
        await s.sensor("A-001", False)
        await s.advance(5, step=5)  # the vacancy counts from the first vacant report, not from the commit
        await s.advance(295, step=295)
        await s.sensor("A-001", False)  # a heartbeat: the sensor is alive
        await s.advance(299, step=299)
        assert s.alerts("session.vacated") == []
        await s.advance(1)
        alert = await s.published(lambda: s.alerts("session.vacated"))
        assert alert[0]["subject"] == {"session": started["session_id"], "slot": "A-001"}
        assert s.moved() == [("A-001", None, "vacated")]
        await s.published(lambda: s.slot("A-001")["status"] == "available" and s.slot("A-001")["session"] is None)
        await s.published(lambda: s.availability()["available"] == 7)
        # The session runs on without a slot: its exit still ends it, with slot null.
        await s.exit("AAA111")
        ended = s.obs.events("session.ended")[0]
        assert ended["session_id"] == started["session_id"] and ended["slot"] is None
        await s.advance(3600, step=600)
        assert len(s.alerts("session.vacated")) == 1
    check_store(cfg)


async def test_a_sensor_silent_since_before_the_car_came_does_not_release_it(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", False)  # its last word: it dies now
        await s.advance(5)
        started = await s.enter("AAA111")
        assert started["slot"] == "A-001"
        await s.advance(880)  # the grace has run out, but the sensor has not been heard since the car came
        assert s.alerts("session.vacated") == [] and s.moved() == []
        await s.advance(30)
        await s.published(lambda: s.alerts("sensor.offline"))  # offline at +900: the countdown is cancelled
        await s.advance(3600, step=600)
        assert s.alerts("session.vacated") == [] and s.moved() == []
        assert s.slot("A-001")["session"] == started["session_id"] and s.slot("A-001")["status"] == "occupied"
    check_store(cfg)


async def test_a_sensor_that_died_before_the_car_came_does_not_release_it(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", False)
        await s.advance(5)
        for _ in range(3):  # a live sensor, heartbeating every minute
            await s.advance(60)
            await s.sensor("A-001", False)
        started = await s.enter("AAA111")  # A-001, vacant: the vacate grace counts from now (+185)
        await s.advance(60)
        await s.sensor("A-001", False)  # +245, its last word (the store has it by the next flush); then it dies
        await s.advance(60)  # and the car parks over it unseen
        await s.advance(485)  # +790: the grace has run out; heard since the vacancy began, but not for 545 s
        assert s.alerts("session.vacated") == [] and s.moved() == []
        await s.advance(600)
        await s.published(lambda: s.alerts("sensor.offline"))  # offline at +1145: the countdown is cancelled
        await s.advance(3600, step=600)
        assert s.alerts("session.vacated") == [] and s.moved() == []
        assert s.slot("A-001")["session"] == started["session_id"] and s.slot("A-001")["status"] == "occupied"
    check_store(cfg)


async def a001_dies(s: Site) -> None:
    """A-001's sensor reports once and falls silent; A-002's heartbeats on until A-001 is offline (900 s)."""
    await s.sensor("A-001", False)
    await s.sensor("A-002", False)
    await s.advance(5)
    for _ in range(16):
        await s.advance(60)
        await s.sensor("A-002", False)
    await s.published(lambda: s.slot("A-001")["sensor"] == "offline")


async def test_a_session_never_seen_is_seated_where_no_sensor_sees_after_its_grace(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await a001_dies(s)
        started = await s.enter("AAA111")
        assert started["slot"] == "A-002"
        # Its car parks over the dead sensor in A-001: A-002's live sensor never sees it.
        for _ in range(10):
            await s.advance(60)
            await s.sensor("A-002", False)
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved() == [("A-002", None, "vacated"), (None, "A-001", "unseen")]
        assert all(e["session_id"] == started["session_id"] for e in s.obs.events("session.moved"))
        await s.published(lambda: s.slot("A-001")["session"] == started["session_id"])
        await s.published(lambda: s.slot("A-002")["status"] == "available")
        await s.published(lambda: s.availability()["available"] == 6)
        # Its exit frees A-001.
        await s.exit("AAA111")
        await s.published(lambda: s.slot("A-001")["status"] == "available")
    check_store(cfg)


async def test_a_car_that_left_its_slot_without_an_exit_is_seated_where_no_sensor_sees(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await a001_dies(s)
        started = await s.park("AAA111")
        assert started["slot"] == "A-002"
        await s.advance(60)
        # The car moves over the dead sensor in A-001: A-002 reports vacant, and no exit comes.
        for _ in range(11):
            await s.sensor("A-002", False)
            await s.advance(60)
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved() == [("A-002", None, "vacated"), (None, "A-001", "unseen")]
        await s.published(lambda: s.slot("A-001")["session"] == started["session_id"])
        await s.published(lambda: s.availability()["zones"]["A"]["occupied"] == 1)
    check_store(cfg)


async def test_a_session_seated_unseen_is_taken_for_a_car_found_later_without_one(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        cars = {"A-002": False, "A-003": False, "A-004": False}  # what the live sensors see

        async def heartbeats(minutes: int) -> None:
            for _ in range(minutes):
                await s.advance(60)
                for slot, occupied in cars.items():
                    await s.sensor(slot, occupied)

        await s.sensor("A-001", False)  # it dies now
        await heartbeats(16)
        await s.published(lambda: s.slot("A-001")["sensor"] == "offline")
        first = await s.enter("BBB222")
        await s.advance(10, step=10)
        second = await s.enter("AAA111")
        assert (first["slot"], second["slot"]) == ("A-002", "A-003")
        # AAA111's car parks in A-004 and is taken for BBB222's (the older session on its way); BBB222's car parks
        # over the dead sensor in A-001, unseen.
        cars["A-004"] = True
        await s.sensor("A-004", True)
        await s.advance(5, step=5)
        await s.published(lambda: s.moved() == [("A-002", "A-004", "reseated")])
        # AAA111's grace runs out: it is seated where no sensor sees, A-001 (right in the counts, not in the names).
        await heartbeats(10)
        await s.published(lambda: len(s.moved()) == 3)
        assert s.moved()[1:] == [("A-003", None, "vacated"), (None, "A-001", "unseen")]
        # Past AAA111's arrival window, BBB222 leaves from A-001; A-004 still reports a car: the unseen guess was
        # AAA111's, and it is corrected.
        await heartbeats(6)
        await s.exit("BBB222")
        await s.published(lambda: len(s.moved()) == 4)
        assert s.moved()[3] == ("A-001", "A-004", "reseated")
        assert s.obs.events("session.moved")[3]["session_id"] == second["session_id"]
        await s.published(lambda: s.slot("A-001")["status"] == "available")
        assert s.slot("A-004")["session"] == second["session_id"]
        assert s.alerts("slot.unregistered_occupancy") == []
    check_store(cfg)


async def test_a_session_released_by_its_grace_is_placed_in_the_zone_it_was_sent_to(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    zone_c = '  [[lots.zones]]\n  id = "C"\n  slots = [{ ids = "C-001", offline_after = 60 }, { ids = "C-002" }]'
    cfg = reconcile_config(tmp_path / "state", mosquitto.port, zones=zone_c, zone_a=ZONE_A_DARK_001)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        for slot in SLOTS_WITH_C:
            await s.sensor(slot, False)
        await s.advance(65)
        await s.published(lambda: len(s.alerts("sensor.offline")) == 2)  # A-001 and C-001: dark, free
        aaa = await s.enter("AAA111")
        assert aaa["slot"] == "A-002"
        await s.advance(30)
        # A car in C-002 is taken for AAA111's, the only session on its way ...
        await s.sensor("C-002", True)
        await s.advance(5)
        await s.published(lambda: s.moved() == [("A-002", "C-002", "reseated")])
        # ... and leaves again without an exit: it was not AAA111's (that one's would have left through the exit).
        await s.advance(60)
        await s.sensor("C-002", False)
        for _ in range(2):  # heartbeats through the grace
            await s.advance(300, step=60)
            await s.sensor("C-002", False)
        await s.advance(10)
        await s.published(lambda: len(s.moved()) == 3)
        # AAA111's car is likelier over the dead sensor of the zone it was sent to than over zone C's.
        assert s.moved()[1:] == [("C-002", None, "vacated"), (None, "A-001", "unseen")]
        assert s.obs.events("session.moved")[2]["session_id"] == aaa["session_id"]
    check_store(cfg)


async def test_a_free_slot_going_offline_takes_a_session_running_on_without_one(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        for slot in ("A-001", "A-002", "A-003", "A-004"):
            await s.sensor(slot, False)
        await s.advance(5)
        started = await s.enter("AAA111")
        assert started["slot"] == "A-001"
        # A-002's sensor dies now, and AAA111's car parks over it unseen; the others heartbeat.
        for minute in range(1, 16):
            await s.advance(60)
            for slot in ("A-001", "A-003", "A-004"):
                await s.sensor(slot, False)
            if minute == 11:  # the grace has run out, and no sensor is offline yet: it runs on without a slot
                await s.published(lambda: s.moved() == [("A-001", None, "vacated")])
        await s.published(lambda: s.slot("A-002")["sensor"] == "offline")
        await s.published(lambda: len(s.moved()) == 2)
        assert s.moved()[1] == (None, "A-002", "unseen")
        await s.published(lambda: s.slot("A-002")["session"] == started["session_id"])
        await s.published(lambda: s.availability()["zones"]["A"]["occupied"] == 1)
    check_store(cfg)


@pytest.mark.parametrize("freed_by", ["exit", "reseat"])
async def test_an_unseen_guess_in_another_zone_moves_home_when_a_dark_slot_there_is_free(
    tmp_path: Path, mosquitto: MosquittoProcess, freed_by: str
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        cars = {"A-002": False, "A-003": False, "A-004": False}  # what the live sensors see

        async def heartbeats(minutes: int, every: int = 60) -> None:
            for _ in range(minutes * 60 // every):
                await s.advance(every, step=every)
                for slot, occupied in cars.items():
                    await s.sensor(slot, occupied)

        await s.sensor("A-001", False)  # both die now: A-001 (offline after 900 s) and T-001 (after 3600 s)
        await s.sensor("T-001", False)
        await heartbeats(61, every=300)
        await s.published(lambda: s.slot("T-001")["sensor"] == "offline" and s.slot("A-001")["sensor"] == "offline")
        # AAA111's car parks over T-001, unseen; after its grace it is taken to be in A-001 (its own zone first).
        first = await s.enter("AAA111")
        await heartbeats(11)
        await s.published(lambda: s.slot("A-001")["session"] == first["session_id"])
        # BBB222's car parks over A-001, unseen; the only dark slot left free is T-001, in the other zone.
        second = await s.enter("BBB222")
        assert first["slot"] == second["slot"] == "A-002"
        await heartbeats(11)
        await s.published(lambda: s.slot("T-001")["session"] == second["session_id"])
        if freed_by == "exit":  # AAA111 leaves (from T-001)
            await s.exit("AAA111")
        else:  # a car nobody is on the way for comes into A-003: it is taken for AAA111's, the older guess
            cars["A-003"] = True
            await s.sensor("A-003", True)
            await s.advance(10, step=5)
            await s.published(lambda: ("A-001", "A-003", "reseated") in s.moved())
        # A-001 is free and dark, and BBB222, of zone A, moves home there.
        await s.published(lambda: s.slot("A-001")["session"] == second["session_id"])
        assert s.moved()[-1] == ("T-001", "A-001", "unseen")
        await s.published(lambda: s.slot("T-001")["status"] == "available")
        zones = s.availability()["zones"]
        assert (zones["A"]["occupied"], zones["B"]["occupied"]) == (1 if freed_by == "exit" else 2, 0)
    check_store(cfg)


async def test_sensor_offline_alerts_and_its_slot_is_allocated_last(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", False)
        await s.sensor("A-002", False)
        await s.sensor("T-001", False)
        await s.advance(5)
        conn = reader(cfg)
        stored: set[float] = set()
        for _ in range(14):  # A-002 heartbeats every minute; A-001 and T-001 stay silent
            await s.advance(60)
            await s.sensor("A-002", False)
            await s.settle()
            stored |= {d for (d,) in conn.execute("SELECT due FROM deadlines WHERE subject = 'A-002'")}
        conn.close()
        # Heartbeats never write: A-002's stored deadline moved only with the flush, once in 3 minutes at most.
        assert 1 <= len(stored) <= 6
        assert s.alerts("sensor.offline") == []
        await s.advance(900 - 5 - 14 * 60 - 1, step=60)  # 1 s before A-001's deadline
        assert s.alerts("sensor.offline") == []
        await s.advance(1)
        alert = await s.published(lambda: s.alerts("sensor.offline"))
        assert [a["subject"] for a in alert] == [{"slot": "A-001", "sensor": "A-001"}]
        await s.published(lambda: s.slot("A-001")["sensor"] == "offline")
        doc = await s.published(lambda: s.availability()["sensors"]["offline"] == 1 and s.availability())
        assert doc["sensors"] == {"vacant": 2, "occupied": 0, "offline": 1, "none": 4}
        # The TTS group's own offline_after (3600 s) still runs for T-001.
        for _ in range(9):
            await s.advance(300, step=300)
            await s.sensor("A-002", False)
        await s.published(lambda: len(s.alerts("sensor.offline")) == 2)
        assert s.alerts("sensor.offline")[1]["subject"]["sensor"] == "T-001"
        # Allocation: healthy vacant first, then no sensor (A-003, A-004, B-001, B-002), offline last.
        slots = [(await s.enter(f"CAR{i}"))["slot"] for i in range(7)]
        assert slots == ["A-002", "A-003", "A-004", "B-001", "B-002", "A-001", "T-001"]
        # A sensor heard again is back.
        await s.sensor("A-001", True)
        await s.advance(5)
        back = await s.published(lambda: s.alerts("sensor.online"))
        assert back[0]["subject"]["sensor"] == "A-001"
        await s.published(lambda: s.slot("A-001")["sensor"] == "occupied")
        assert len(s.alerts("sensor.offline")) == 2
    check_store(cfg)


async def test_low_battery_alerts_once_a_day_or_after_recovery(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", False, battery=3.6)
        await s.sensor("A-001", False, battery=3.25)
        await s.published(lambda: s.alerts("sensor.battery_low"))
        for _ in range(5):
            await s.advance(3600, step=3600)
            await s.sensor("A-001", False, battery=3.2)
        await s.sensor("A-001", False, battery=3.35)  # within the hysteresis: not recovered
        await s.sensor("A-001", False, battery=3.2)
        await s.settle()
        assert len(s.alerts("sensor.battery_low")) == 1
        await s.advance(86400 - 5 * 3600, step=3600)
        await s.sensor("A-001", False, battery=3.2)  # a day later, still low
        await s.published(lambda: len(s.alerts("sensor.battery_low")) == 2)
        await s.sensor("A-001", False, battery=3.6)  # new battery
        await s.sensor("A-001", False, battery=3.1)
        await s.published(lambda: len(s.alerts("sensor.battery_low")) == 3)
        # The TTS group's own threshold (3.0 V).
        await s.sensor("T-001", False, battery=3.1)
        await s.sensor("T-001", False, battery=2.9)
        low = await s.published(lambda: len(s.alerts("sensor.battery_low")) == 4 and s.alerts("sensor.battery_low"))
        assert [a["subject"]["sensor"] for a in low] == ["A-001", "A-001", "A-001", "T-001"]
        assert "2.90 V" in low[3]["message"]
    conn = reader(cfg)
    doc = status_document(conn)
    conn.close()
    assert [x["sensor"] for x in doc["battery_low"]] == ["A-001", "T-001"]


async def test_block_on_an_occupied_slot_applies_once_it_is_free(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        started = await s.enter("AAA111")
        await s.sensor("A-001", True)  # seated
        await s.sensor("A-002", True)  # a car without a session
        await s.advance(5)
        await s.published(lambda: s.alerts("slot.unregistered_occupancy"))
        for slot in (started["slot"], "A-002"):
            reply = await s.obs.request("block", {"slot": slot, "reason": "paint"})
            assert reply["status"] == "ok"
        await s.settle()
        assert s.slot("A-001")["status"] == "occupied" and s.slot("A-002")["status"] == "occupied"
        await s.exit("AAA111")
        assert s.slot("A-001")["status"] == "occupied"  # the car is still there
        for slot in ("A-001", "A-002"):
            await s.sensor(slot, False)
        await s.advance(5)
        await s.published(lambda: s.slot("A-001")["status"] == "blocked" and s.slot("A-002")["status"] == "blocked")
        doc = await s.published(lambda: s.availability()["blocked"] == 2 and s.availability())
        assert doc["available"] == 5
        # Blocked slots are never allocated, vacant sensor or not.
        assert (await s.enter("BBB222"))["slot"] == "A-003"
    check_store(cfg)


async def test_sensor_counts_agree_in_the_document_the_request_and_status(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    async with site(cfg, ManualClock(), mosquitto.port) as s:
        await s.sensor("A-001", True)
        await s.sensor("A-002", False)
        await s.sensor("T-001", False)
        await s.advance(5)
        await s.advance(900, step=300)  # go silent; T-001 has an hour
        await s.published(lambda: s.availability()["sensors"]["offline"] == 2)
        published = s.availability()
        reply = await s.obs.request("availability", {"lot": "lot1"})
        conn = reader(cfg)
        status = status_document(conn)
        conn.close()
        for doc in (reply["data"], status["lots"][0]):
            assert {k: v for k, v in doc.items() if k != "ts"} == {k: v for k, v in published.items() if k != "ts"}
        assert published["sensors"] == {"vacant": 1, "occupied": 0, "offline": 2, "none": 4}
        # A-001's car without a session: once offline, only sessions count (sessions are the truth).
        assert published["available"] == 7
        assert [x["slot"] for x in status["sensors_offline"]] == ["A-001", "A-002"]


async def _timer_scenario(tmp_path: Path, port: int, jumps: list[float]) -> list[tuple[str, str]]:
    """Debounce, vacate grace, re-seating, arrival window, offline and the battery day, with wall steps between."""
    cfg = reconcile_config(tmp_path / "state", port)
    clock = ManualClock()
    steps = iter(jumps * 50)
    async with site(cfg, clock, port) as s:

        async def wait(seconds: float, step: float = 300) -> None:
            clock.jump(next(steps))
            await s.advance(seconds, step=step)

        await s.sensor("A-001", False)
        await s.sensor("A-004", False)
        await s.sensor("T-001", True, battery=2.9)  # low battery; and a car without a session
        await wait(5)
        await s.enter("AAA111")  # A-001, vacant: its vacate grace counts from now (+5)
        await wait(1)
        await s.enter("BBB222")  # A-004, vacate due at +606
        await wait(1)
        await s.enter("CCC333")  # A-002, no sensor: on its way until +907
        await wait(293)
        await s.sensor("A-004", False)  # +300: A-004 is alive (a silent one would not release BBB222)
        await wait(7)
        await s.sensor("A-003", True)  # +307: AAA111, the oldest, is re-seated there
        await wait(5)
        await wait(294)  # +606: BBB222 never showed up in A-004
        await s.sensor("B-001", True)  # BBB222 has no slot: re-seated
        await wait(5)
        await wait(289)  # +900: silent since +0
        await s.sensor("T-001", True, battery=2.9)  # still low: no second alert within the day
        await wait(10)
        await s.sensor("B-002", True)  # +910: CCC333's arrival window has ended
        await wait(5)
        await wait(86400, step=3600)
        await s.sensor("T-001", True, battery=2.9)  # a day later: alert again
        await wait(10)
        events = s.obs.events()
    out = []
    for e in events:
        fields = {k: e.get(k) for k in ("code", "subject", "slot", "from_slot", "to_slot", "sensor", "status")}
        if fields["subject"] is not None:
            fields["subject"] = {k: v for k, v in fields["subject"].items() if k != "session"}  # a uuid
        out.append((e["type"], json.dumps(fields)))
    return out


async def test_wall_clock_steps_of_two_hours_change_no_timer_outcome(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    plain = await _timer_scenario(tmp_path / "plain", mosquitto.port, [0.0])
    stepped = await _timer_scenario(tmp_path / "stepped", mosquitto.port, [7200.0, -7200.0, -7200.0, 7200.0])
    assert stepped == plain
    moved = [json.loads(f) for t, f in plain if t == "session.moved"]
    assert [(m["from_slot"], m["to_slot"]) for m in moved] == [("A-001", "A-003"), ("A-004", None), (None, "B-001")]
    alerts = [json.loads(f)["code"] for t, f in plain if t == "alert"]
    assert alerts.count("sensor.battery_low") == 2 and alerts.count("session.vacated") == 1
    # T-001 at the start, B-002 after CCC333's window, T-001 again when its sensor is back from offline.
    assert alerts.count("slot.unregistered_occupancy") == 3
    assert alerts.count("sensor.offline") >= 2


async def test_a_restart_keeps_vacate_and_offline_countdowns(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    cfg = reconcile_config(tmp_path / "state", mosquitto.port)
    clock = ManualClock()
    async with site(cfg, clock, mosquitto.port) as s:
        await s.sensor("A-001", False)
        await s.sensor("A-002", False)
        await s.advance(5)
        await s.enter("AAA111")  # vacate grace due at +600
        for i in range(5):
            await s.advance(60)
            await s.sensor("A-002", False)  # A-002's last report at +300: offline due at +1200
            if i < 3:
                await s.sensor("A-001", False)  # A-001's last at +180: offline due at +1080
        await s.advance(100)  # +400
    conn = reader(cfg)
    stored = dict(conn.execute("SELECT subject, due FROM deadlines WHERE kind = ?", (OFFLINE,)).fetchall())
    conn.close()
    async with site(cfg, clock, mosquitto.port) as s:
        await s.advance(199, step=199)  # +599
        assert s.alerts("session.vacated") == []
        await s.advance(1)
        await s.published(lambda: s.alerts("session.vacated"))
        await s.advance(1200 - 600 - 1, step=100)  # +1199
        # A-001 went offline at +1080; A-002 is due at +1200 exactly.
        assert [a["subject"]["sensor"] for a in s.alerts("sensor.offline")] == ["A-001"]
        await s.advance(1)
        await s.published(lambda: len(s.alerts("sensor.offline")) == 2)
        await s.advance(3600, step=600)
        assert [a["subject"]["sensor"] for a in s.alerts("sensor.offline")] == ["A-001", "A-002"]
        assert len(s.alerts("session.vacated")) == 1
    assert stored["A-002"] - stored["A-001"] == 120.0
    check_store(cfg)
