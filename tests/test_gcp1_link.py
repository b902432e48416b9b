"""The GCP/1 host link (drivers.gcp1.link) against the barrier simulator, over real pseudo-terminals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from drivers.gcp1.frames import AckResult, Barrier, Event, EventCode, Loops, Mode, Status, encode, encode_frame
from drivers.gcp1.link import Controller, GcpLink, LinkDown, NoAck
from drivers.gcp1.transport import Backoff
from simulators.barrier import BarrierSim, Noise, PtyLine, Timings
from simulators.barrier import wire as sim_wire
from tests.gcp1_helpers import no_leaks, until

pytestmark = pytest.mark.usefixtures("no_leaks")
__all__ = ["no_leaks"]

FAST = Timings(opening=0.02, closing=0.02, hold=0.3, dwell=0.01, event_resend=0.1)


@dataclass
class Rig:
    sim: BarrierSim
    link: GcpLink
    gate: Controller
    events: list[Event] = field(default_factory=list)
    online: list[bool] = field(default_factory=list)


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    handler: Callable[[Rig, Event], Awaitable[None]] | None = None,
    initial_seq: int | None = None,
    timings: Timings = FAST,
    link_options: dict[str, Any] | None = None,
    **sim_options: Any,
) -> AsyncIterator[Rig]:
    sim = BarrierSim(tmp_path / "ttyGATE1", timings=timings, **sim_options)
    link = GcpLink(str(sim.path), backoff=Backoff(0.02, 0.1), **(link_options or {}))
    holder: list[Rig] = []

    async def on_event(event: Event) -> None:
        if handler is not None:
            await handler(holder[0], event)
        holder[0].events.append(event)

    gate = link.add_controller(
        1, on_event=on_event, on_online=lambda o: holder[0].online.append(o), initial_seq=initial_seq
    )
    r = Rig(sim, link, gate)
    holder.append(r)
    await sim.start()
    await link.start()
    try:
        await until(lambda: link.connected)
        yield r
    finally:
        await link.close()
        await sim.close()


def codes(events: list[Event]) -> list[EventCode]:
    return [e.code for e in events]


async def test_commands_get_their_acks_and_act(tmp_path: Path) -> None:
    async with rig(tmp_path, initial_seq=10) as r:
        assert await r.gate.open_barrier() is AckResult.OK
        await until(lambda: EventCode.OPENED in codes(r.events))
        assert await r.gate.display("L1-042") is AckResult.OK
        assert r.sim.display_text == "L1-042"
        assert await r.gate.set_mode(Mode.LOCKED_OPEN) is AckResult.OK
        status = await r.gate.ping()
        assert status == Status(Barrier.OPEN, Loops.NONE, Mode.LOCKED_OPEN) == r.gate.status
        assert await r.gate.close_barrier() is AckResult.REFUSED  # locked open
        assert await r.gate.set_mode(Mode.NORMAL) is AckResult.OK
        await until(lambda: EventCode.CLOSED in codes(r.events))
        sent = [(c.seq, c.cmd, c.outcome) for c in r.sim.commands]
        assert sent == [
            (10, sim_wire.OPEN, "executed"),
            (11, sim_wire.DISPLAY, "executed"),
            (12, sim_wire.SET_MODE, "executed"),
            (13, sim_wire.PING, "answered"),
            (14, sim_wire.CLOSE, "executed"),
            (15, sim_wire.SET_MODE, "executed"),
        ]
        assert r.online == [True]


async def test_a_lost_ack_is_answered_by_a_resend_with_the_same_seq(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.sim.drop_acks(1)
        assert await r.gate.open_barrier() is AckResult.OK
        opens = [c for c in r.sim.commands if c.cmd == sim_wire.OPEN]
        assert [c.outcome for c in opens] == ["executed", "repeat"]
        assert opens[0].seq == opens[1].seq and opens[0].payload == opens[1].payload
        assert r.link.stats.resends == 1
        await until(lambda: EventCode.OPENED in codes(r.events))
        assert codes(r.events).count(EventCode.OPENED) == 1


async def test_no_ack_after_three_resends_is_an_error_and_the_next_command_goes_on(tmp_path: Path) -> None:
    async with rig(tmp_path, initial_seq=77) as r:
        r.sim.drop_acks(4)
        with pytest.raises(NoAck) as failure:
            await r.gate.display("FULL")
        assert (failure.value.seq, failure.value.attempts) == (77, 4)
        displays = [(c.seq, c.outcome) for c in r.sim.commands]
        assert displays == [(77, "executed"), (77, "repeat"), (77, "repeat"), (77, "repeat")]
        assert (r.link.stats.resends, r.link.stats.no_ack) == (3, 1)
        assert await r.gate.display("L1-001") is AckResult.OK
        assert r.sim.commands[-1].seq == 78


async def test_seqs_wrap_from_255_to_1_both_ways(tmp_path: Path) -> None:
    async with rig(tmp_path, initial_seq=253, first_event_seq=254) as r:
        for text in ("A", "B", "C", "D", "E"):
            assert await r.gate.display(text) is AckResult.OK
        assert [(c.seq, c.outcome) for c in r.sim.commands] == [
            (253, "executed"),
            (254, "executed"),
            (255, "executed"),
            (1, "executed"),
            (2, "executed"),
        ]
        for _ in range(3):
            r.sim.press_ticket()
        await until(lambda: len(r.events) == 3 and not r.sim.unacked)
        assert [e.seq for e in r.sim.events] == [254, 255, 1]


async def test_a_repeated_event_seq_is_acked_again_and_delivered_once(tmp_path: Path) -> None:
    # Two events on the line at once, both host ACKs lost: the controller resends both, and the host knows
    # each seq it handled in the last 10 s, not only the last one.
    async with rig(tmp_path, events_in_flight=4) as r:
        r.sim.lose_host_acks(2)
        r.sim.press_ticket()
        r.sim.vehicle_arrives()
        await until(lambda: not r.sim.unacked)
        assert codes(r.events) == [EventCode.TICKET, EventCode.ARRIVED]
        for event in r.sim.events:
            acks = [c.outcome for c in r.sim.received if c.cmd == sim_wire.HOST_ACK and c.seq == event.seq]
            assert event.sends >= 2 and acks[0] == "lost" and "ack" in acks
        assert r.link.stats.duplicate_events >= 2


async def test_an_event_is_acked_only_once_its_handler_returned(tmp_path: Path) -> None:
    release = asyncio.Event()
    returned_at: list[float] = []
    calls = 0

    async def slow_commit(r: Rig, event: Event) -> None:
        nonlocal calls
        calls += 1
        await release.wait()
        returned_at.append(asyncio.get_running_loop().time())

    async with rig(tmp_path, handler=slow_commit) as r:
        r.sim.press_ticket()
        sent = r.sim.events[0]
        await until(lambda: sent.sends >= 3)  # resent while the handler is still committing
        assert (calls, sent.acks) == (1, 0)
        release.set()
        await until(lambda: sent.acked_at is not None)
        assert sent.acked_at is not None and sent.acked_at >= returned_at[0]
        assert calls == 1  # (a resend crossing the ACK on the line is ACKed again: acks may be 2)


async def test_a_failing_handler_gets_the_event_again_and_it_is_acked_once_handled(tmp_path: Path) -> None:
    failures = 2

    async def flaky_commit(r: Rig, event: Event) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("database is locked")

    async with rig(tmp_path, handler=flaky_commit) as r:
        r.sim.fault(17)
        await until(lambda: not r.sim.unacked)
        assert r.events == [Event(EventCode.FAULT, 17)]
        assert r.sim.events[0].sends >= 3
        assert r.link.stats.handler_errors == 2


async def test_offline_after_three_seconds_of_silence_and_online_when_it_talks_again(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.gate.ping()
        loop = asyncio.get_running_loop()
        r.sim.go_silent()
        silent_at = loop.time()
        await until(lambda: r.online == [True, False], timeout=5)
        assert loop.time() - silent_at >= 2.9
        assert r.link.connected and not r.gate.online
        r.sim.resume()
        await r.gate.ping()
        assert r.online == [True, False, True] and r.gate.online


async def test_every_command_completes_through_heavy_line_noise(tmp_path: Path) -> None:
    noise = Noise(garbage=0.8, corrupt=0.1, truncate=0.1, inbound=0.05, seed=7)
    async with rig(tmp_path, initial_seq=100, noise=noise) as r:
        for n in range(30):
            assert await r.gate.display(f"L1-{n:03d}") is AckResult.OK
            if n % 6 == 0:
                r.sim.press_ticket()
        await until(lambda: len(r.events) == 5 and not r.sim.unacked)
        assert codes(r.events) == [EventCode.TICKET] * 5
        assert r.sim.display_text == "L1-029"
        stats = r.link.stats
        assert stats.noise_bytes > 0 and stats.bad_crc > 0 and stats.resends > 0


async def test_unplug_and_replug_at_the_same_path_loses_no_event_and_applies_none_twice(tmp_path: Path) -> None:
    async def commit_then_maybe_unplug(r: Rig, event: Event) -> None:
        if event.code == EventCode.TICKET:
            r.sim.unplug()  # the adapter is pulled after the commit, before the ACK goes out

    # A short memory of handled events (0.3 s here, 10 s by default) and a longer outage: the memory counts
    # connected time only, so the ACK lost with the port still finds its event remembered after the replug.
    async with rig(tmp_path, handler=commit_then_maybe_unplug, link_options={"dedupe_window": 0.3}) as r:
        r.sim.vehicle_arrives()
        await until(lambda: len(r.events) == 1 and not r.sim.unacked)
        r.sim.press_ticket()
        await until(lambda: not r.link.connected)
        assert r.online == [True, False] and not r.sim.path.exists()
        with pytest.raises(LinkDown):
            await r.gate.open_barrier()
        r.sim.vehicle_backs_out()  # happens while unplugged: kept and resent by the controller
        await asyncio.sleep(0.5)  # the link keeps trying the vanished path
        r.sim.replug()
        await until(lambda: r.link.connected and not r.sim.unacked)
        assert codes(r.events) == [EventCode.ARRIVED, EventCode.TICKET, EventCode.BACKED_OUT]
        ticket = r.sim.events[1]
        assert ticket.sends >= 2  # its ACK died with the port; acknowledged (not delivered) after the replug
        assert r.link.stats.duplicate_events >= 1
        assert r.online == [True, False, True]
        assert await r.gate.open_barrier() is AckResult.OK
        assert r.link.port.opens == 2


async def test_the_link_waits_for_a_port_that_is_not_there_yet(tmp_path: Path) -> None:
    path = tmp_path / "ttyGATE9"
    online: list[bool] = []

    async def ignore(event: Event) -> None:
        pass

    async with GcpLink(str(path), backoff=Backoff(0.02, 0.1), offline_after=0.2) as link:
        gate = link.add_controller(1, on_event=ignore, on_online=online.append)
        with pytest.raises(LinkDown):
            await gate.ping()
        await until(lambda: online == [False])  # nothing heard since the start
        async with BarrierSim(path, timings=FAST):
            await until(lambda: link.connected)
            assert (await gate.ping()).barrier is Barrier.CLOSED
            assert online == [False, True]
        assert link.port.open_failures > 0


async def test_the_belt_refuses_close_while_the_latest_status_shows_a_vehicle(tmp_path: Path) -> None:
    async with rig(tmp_path, timings=Timings(opening=0.02, closing=0.02, hold=5, status_interval=0.05)) as r:
        assert await r.gate.open_barrier() is AckResult.OK
        r.sim.vehicle_arrives()
        await until(lambda: r.gate.status is not None and r.gate.status.loops == Loops.A)
        assert await r.gate.close_barrier() is AckResult.REFUSED
        assert all(c.cmd != sim_wire.CLOSE for c in r.sim.commands)
        assert r.link.stats.refused_by_belt == 1


async def test_the_controller_refuses_close_when_the_status_is_not_yet_news(tmp_path: Path) -> None:
    async with rig(tmp_path, timings=Timings(opening=0.02, closing=0.02, hold=5)) as r:
        assert await r.gate.open_barrier() is AckResult.OK
        await r.gate.ping()
        r.sim.vehicle_arrives()  # the link's latest STATUS still shows the loops clear
        assert await r.gate.close_barrier() is AckResult.REFUSED
        (close,) = [c for c in r.sim.commands if c.cmd == sim_wire.CLOSE]
        assert close.loop_a and close.result == sim_wire.REFUSED


async def test_two_controllers_share_one_line_by_address(tmp_path: Path) -> None:
    line = PtyLine(tmp_path / "ttyBUS")
    line.plug()
    got: dict[int, list[Event]] = {1: [], 2: []}

    def handler(address: int) -> Callable[[Event], Awaitable[None]]:
        async def on_event(event: Event) -> None:
            got[address].append(event)

        return on_event

    try:
        async with (
            BarrierSim(line=line, address=1, timings=FAST) as one,
            BarrierSim(line=line, address=2, timings=FAST) as two,
            GcpLink(str(line.path)) as link,
        ):
            gates = {a: link.add_controller(a, on_event=handler(a)) for a in (1, 2)}
            await until(lambda: link.connected)
            assert await gates[2].display("EXIT") is AckResult.OK
            assert await gates[1].display("L1-007") is AckResult.OK
            assert (one.display_text, two.display_text) == ("L1-007", "EXIT")
            one.press_ticket()
            two.vehicle_arrives()
            await until(lambda: len(got[1]) == len(got[2]) == 1)
            assert (got[1][0].code, got[2][0].code) == (EventCode.TICKET, EventCode.ARRIVED)
    finally:
        line.unplug()


async def test_malformed_frames_and_strangers_are_counted_and_never_raise(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        before = r.link.stats.frames_in
        r.sim.line.write(encode_frame(9, 0, 0x81, b"\x00\x00\x00"))  # an address nobody registered
        r.sim.line.write(encode_frame(1, 0, 0x81, b"\x07\x00\x00"))  # barrier state 7
        r.sim.line.write(encode_frame(1, 33, 0x90, b"\x63"))  # event code 99: ACKed so it is not resent forever
        r.sim.line.write(encode_frame(1, 0, 0x90, b"\x01"))  # an event on seq 0
        r.sim.line.write(encode(1, 34, Status(Barrier.CLOSED, Loops.NONE, Mode.NORMAL)))  # answers no PING
        r.sim.line.write(b"\x02\x01\x02\x03\x04\x05garbage\x02")
        await until(lambda: r.link.stats.frames_in >= before + 5)
        stats = r.link.stats
        assert (stats.unknown_address, stats.malformed, stats.stale_replies) == (1, 3, 1)
        await until(lambda: any(c.cmd == sim_wire.HOST_ACK and c.seq == 33 for c in r.sim.received))
        assert r.events == []
        assert await r.gate.ping() is not None
