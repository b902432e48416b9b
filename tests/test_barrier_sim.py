"""The barrier-controller simulator, driven by a raw host on its pty, and its codec against the driver's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.gcp1.frames import (
    Ack,
    AckResult,
    Close,
    Cmd,
    Display,
    Event,
    EventCode,
    Frame,
    Mode,
    Open,
    Ping,
    SetMode,
    decode_controller,
    encode,
    encode_frame,
)
from simulators.barrier import BarrierFleet, BarrierSim, BarrierState, GateMode, Noise, SimError, Timings
from simulators.barrier import wire as sim_wire
from tests.gcp1_helpers import RawHost, no_leaks, until
from tests.test_gcp1_frames import EXAMPLES

pytestmark = pytest.mark.usefixtures("no_leaks")
__all__ = ["no_leaks"]

QUICK = Timings(opening=0.02, closing=0.02, hold=0.2, dwell=0.01, status_interval=0.05, event_resend=0.05)


class Host(RawHost):
    """A raw host that ACKs every EVENT at once unless told not to."""

    def __init__(self, path: Path, ack_events: bool = True) -> None:
        super().__init__(path)
        self.ack_events = ack_events
        self.seq = 1

    def _readable(self) -> None:
        seen = len(self.frames)
        super()._readable()
        for f in self.frames[seen:]:
            if f.cmd == Cmd.EVENT and self.ack_events:
                self.send(encode(f.addr, f.seq, Ack(f.seq)))

    def command(self, message: Open | Close | SetMode | Display | Ping, seq: int | None = None) -> int:
        if seq is None:
            seq, self.seq = self.seq, self.seq % 255 + 1
        self.send(encode(1, seq, message))
        return seq

    def acks(self, seq: int) -> list[Ack]:
        return [m for f in self.of(Cmd.ACK) if f.seq == seq and isinstance(m := decode_controller(f), Ack)]

    def events(self) -> list[Event]:
        out: list[Event] = []
        seen: set[int] = set()
        for f in self.of(Cmd.EVENT):
            if f.seq not in seen:
                seen.add(f.seq)
                event = decode_controller(f)
                assert isinstance(event, Event)
                out.append(event)
        return out


async def started(path: Path, **options: object) -> BarrierSim:
    sim = BarrierSim(path, **options)  # type: ignore[arg-type]
    await sim.start()
    return sim


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[BarrierSim]:
    s = await started(tmp_path / "ttyGATE1", timings=QUICK)
    yield s
    await s.close()


@pytest.fixture
async def host(sim: BarrierSim) -> AsyncIterator[Host]:
    h = Host(sim.path)
    yield h
    h.close()


# --- the two codecs against each other ------------------------------------------------------------------------


def test_the_simulators_codec_reproduces_the_contract_examples() -> None:
    assert sim_wire.crc16_modbus(b"123456789") == 0x4B37
    for wire_hex, seq, message, _ in EXAMPLES:
        data = bytes.fromhex(wire_hex)
        assert sim_wire.frame(1, seq, message.cmd, message.payload()) == data
        assert sim_wire.Deframer().push(data) == [sim_wire.Received(1, seq, message.cmd, message.payload())]


frames = st.builds(Frame, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.binary(max_size=32))


@given(st.lists(st.tuples(st.binary(max_size=20).map(lambda b: b.replace(b"\x02", b"")), frames), max_size=10))
def test_what_one_codec_encodes_the_other_decodes(segments: list[tuple[bytes, Frame]]) -> None:
    # noise here carries no STX: the driver's parser has its own property for false STX bytes
    stream = b"".join(noise + f.encode() for noise, f in segments)
    assert stream == b"".join(noise + sim_wire.frame(f.addr, f.seq, f.cmd, f.payload) for noise, f in segments)
    got = sim_wire.Deframer().push(stream)
    assert got == [sim_wire.Received(f.addr, f.seq, f.cmd, f.payload) for _, f in segments]


@given(st.binary(max_size=300))
def test_the_simulators_deframer_takes_any_bytes(data: bytes) -> None:
    for f in sim_wire.Deframer().push(data):
        assert sim_wire.frame(f.addr, f.seq, f.cmd, f.payload) in data


# --- the controller -------------------------------------------------------------------------------------------


async def test_status_every_interval_on_seq_0_and_ping_on_its_own_seq(sim: BarrierSim, host: Host) -> None:
    await until(lambda: len(host.of(Cmd.STATUS)) >= 3)
    assert {f.seq for f in host.of(Cmd.STATUS)} == {0}
    seq = host.command(Ping(), seq=99)
    await until(lambda: any(f.seq == seq for f in host.of(Cmd.STATUS)))
    assert sim.commands[-1].outcome == "answered"
    assert host.of(Cmd.ACK) == []


async def test_open_holds_then_closes_by_itself(sim: BarrierSim, host: Host) -> None:
    seq = host.command(Open(0))
    await until(lambda: host.acks(seq))
    assert host.acks(seq)[0].result is AckResult.OK
    await until(lambda: sim.barrier == BarrierState.OPEN)
    await until(lambda: sim.barrier == BarrierState.CLOSED)
    await until(lambda: [e.code for e in host.events()] == [EventCode.OPENED, EventCode.CLOSED])


async def test_a_repeat_is_acked_with_the_first_result_and_not_executed(sim: BarrierSim, host: Host) -> None:
    sim.vehicle_arrives()
    host.command(Close(), seq=5)  # refused: a vehicle on loop A
    await until(lambda: host.acks(5))
    sim.vehicle_backs_out()
    host.command(Close(), seq=5)  # the same frame again: a repeat, even though it would be OK now
    host.command(Display("X"), seq=5)  # same seq, another command: executed
    await until(lambda: len(host.acks(5)) == 3)
    assert [a.result for a in host.acks(5)] == [AckResult.REFUSED, AckResult.REFUSED, AckResult.OK]
    assert [c.outcome for c in sim.commands] == ["executed", "repeat", "executed"]


async def test_a_repeat_is_only_a_repeat_within_the_window(tmp_path: Path) -> None:
    sim = await started(tmp_path / "ttyG", timings=Timings(repeat_window=0.05))
    host = Host(sim.path)
    try:
        host.command(Display("A"), seq=9)
        await until(lambda: sim.commands)
        await asyncio.sleep(0.1)
        host.command(Display("A"), seq=9)
        await until(lambda: len(sim.commands) == 2)
        assert [c.outcome for c in sim.commands] == ["executed", "executed"]
    finally:
        host.close()
        await sim.close()


async def test_never_closes_onto_a_vehicle(tmp_path: Path) -> None:
    sim = await started(tmp_path / "ttyG", timings=replace(QUICK, closing=1.0))
    host = Host(sim.path)
    try:
        await _never_closes_onto_a_vehicle(sim, host)
    finally:
        host.close()
        await sim.close()


async def _never_closes_onto_a_vehicle(sim: BarrierSim, host: Host) -> None:
    host.command(Open(0))
    await until(lambda: sim.barrier == BarrierState.OPEN)
    sim.vehicle_arrives()
    await asyncio.sleep(QUICK.hold * 2)  # the hold is over, but a vehicle waits on loop A
    assert sim.barrier == BarrierState.OPEN
    await sim.vehicle_passes()
    await until(lambda: sim.barrier == BarrierState.CLOSING)
    sim.set_loops(True, False)  # the next one drives up while the arm comes down
    assert (sim.barrier, sim.reversals) == (BarrierState.OPENING, 1)
    await until(lambda: sim.barrier == BarrierState.OPEN)
    sim.set_loops(False, False)
    await until(lambda: sim.barrier == BarrierState.CLOSED)
    await until(lambda: len(host.events()) == 5)
    codes = [e.code for e in host.events()]
    assert codes == [EventCode.OPENED, EventCode.ARRIVED, EventCode.PASSED, EventCode.OPENED, EventCode.CLOSED]


async def test_events_are_resent_until_acked_and_seqs_wrap(tmp_path: Path) -> None:
    sim = await started(tmp_path / "ttyG", timings=QUICK, first_event_seq=255, events_in_flight=2)
    host = Host(sim.path, ack_events=False)
    try:
        sim.press_ticket()
        sim.force_open()
        await until(lambda: all(e.sends >= 3 for e in sim.events))
        assert [(e.seq, e.code) for e in sim.events] == [(255, sim_wire.TICKET), (1, sim_wire.FORCED_OPEN)]
        host.send(encode(1, 255, Ack(255)))
        await until(lambda: [e.seq for e in sim.unacked] == [1])
        sends = sim.events[0].sends
        await asyncio.sleep(QUICK.event_resend * 3)
        assert sim.events[0].sends == sends
    finally:
        host.close()
        await sim.close()


async def test_one_event_in_flight_keeps_them_in_order(sim: BarrierSim) -> None:
    host = Host(sim.path, ack_events=False)
    try:
        sim.vehicle_arrives()
        sim.press_ticket()
        await until(lambda: sim.events[0].sends >= 2)
        assert sim.events[1].sends == 0
        host.send(encode(1, 1, Ack(1)))
        await until(lambda: sim.events[1].sends >= 1)
    finally:
        host.close()


async def test_faults_forced_opens_and_modes(sim: BarrierSim, host: Host) -> None:
    sim.fault(42)
    seq = host.command(Open(0))
    await until(lambda: host.acks(seq))
    assert host.acks(seq)[0].result is AckResult.FAULT
    sim.clear_fault()
    sim.force_open()
    assert sim.barrier == BarrierState.OPEN
    seq = host.command(SetMode(Mode.LOCKED_OPEN))
    await asyncio.sleep(QUICK.hold * 2)
    assert sim.barrier == BarrierState.OPEN and sim.mode == GateMode.LOCKED_OPEN  # no auto-close
    refused = host.command(Close())
    locked = host.command(SetMode(Mode.LOCKED_CLOSED))
    await until(lambda: sim.barrier == BarrierState.CLOSED)
    opened = host.command(Open(5))
    bad = 77
    host.send(encode_frame(1, bad, Cmd.DISPLAY, b"\x07bell"))  # a malformed payload: ACK 2
    await until(lambda: host.acks(bad))
    results = [host.acks(s)[0].result for s in (seq, refused, locked, opened, bad)]
    assert results == [AckResult.OK, AckResult.REFUSED, AckResult.OK, AckResult.REFUSED, AckResult.FAULT]
    events = host.events()
    assert events[:2] == [Event(EventCode.FAULT, 42), Event(EventCode.FORCED_OPEN)]


async def test_a_passing_vehicle_needs_an_open_barrier(sim: BarrierSim) -> None:
    sim.vehicle_arrives()
    with pytest.raises(SimError):
        await sim.vehicle_passes()
    with pytest.raises(SimError):
        sim.vehicle_arrives()


async def test_noise_reaches_the_host_as_noise(tmp_path: Path) -> None:
    sim = await started(tmp_path / "ttyG", timings=QUICK, noise=Noise(garbage=1.0, corrupt=0.5, seed=3))
    host = Host(sim.path)
    try:
        await until(lambda: host.parser.bad_crc >= 3 and len(host.of(Cmd.STATUS)) >= 3)
        assert host.parser.skipped > 0
    finally:
        host.close()
        await sim.close()


async def test_silence_and_speaking_again(sim: BarrierSim, host: Host) -> None:
    await until(lambda: host.frames)
    sim.go_silent()
    await asyncio.sleep(0.01)
    heard = len(host.frames)
    seq = host.command(Display("QUIET"))
    await asyncio.sleep(QUICK.status_interval * 4)
    assert len(host.frames) == heard and sim.display_text == "QUIET"  # still listening, not talking
    sim.resume()
    await until(lambda: len(host.frames) > heard)
    assert not host.acks(seq)


async def test_unplug_closes_the_pty_and_replug_brings_a_new_one_at_the_same_path(tmp_path: Path) -> None:
    sim = await started(tmp_path / "ttyGATE1", timings=QUICK)
    try:
        host = Host(sim.path)
        sim.unplug()
        assert not sim.path.is_symlink()
        await until(lambda: host.hung_up)
        host.close()
        sim.replug()
        assert str(sim.path.readlink()) == sim.line.device  # the same path, a new pair (its number may be reused)
        host = Host(sim.path)
        await until(lambda: host.of(Cmd.STATUS))
        host.close()
    finally:
        await sim.close()
    assert not sim.path.is_symlink()


async def test_a_fleet_of_controllers_at_their_paths(tmp_path: Path) -> None:
    async with BarrierFleet(tmp_path / "dev", 3, timings=QUICK) as fleet:
        assert [p.name for p in fleet.paths] == ["ttyGATE1", "ttyGATE2", "ttyGATE3"]
        hosts = [Host(p) for p in fleet.paths]
        try:
            for n, h in enumerate(hosts):
                h.command(Display(f"GATE{n}"))
            await until(lambda: all(h.of(Cmd.ACK) for h in hosts))
            assert [s.display_text for s in fleet.sims] == ["GATE0", "GATE1", "GATE2"]
        finally:
            for h in hosts:
                h.close()
    assert not any(p.exists() for p in (tmp_path / "dev").iterdir())


async def test_a_fleet_by_gate_names_and_a_car_waiting_for_the_barrier(tmp_path: Path) -> None:
    fleet = BarrierFleet(tmp_path / "dev", names=["in1", "out1"], addresses={"out1": 7}, timings=QUICK)
    async with fleet:
        assert sorted(fleet.by_name) == ["in1", "out1"] and fleet.by_name["out1"].address == 7
        sim = fleet.by_name["in1"]
        host = Host(sim.path)
        try:
            sim.vehicle_arrives()
            # What the traffic scenario does: wait, without polling, for the host's OPEN to lift the barrier.
            waiting = asyncio.ensure_future(sim.wait_until(lambda: sim.barrier == BarrierState.OPEN, timeout=5))
            assert await sim.wait_until(lambda: False, timeout=0.05) is False
            assert not waiting.done()
            host.command(Open(0))
            assert await waiting
            await sim.vehicle_passes()
        finally:
            host.close()
    assert not any((tmp_path / "dev").iterdir())


async def test_frames_for_other_addresses_are_ignored(sim: BarrierSim, host: Host) -> None:
    host.send(encode_frame(2, 3, Cmd.OPEN, b"\x00"))
    host.send(encode_frame(1, 4, 0x42, b""))  # a command it does not know
    await until(lambda: sim.received)
    assert [c.outcome for c in sim.received] == ["ignored"]
    assert sim.barrier == BarrierState.CLOSED
