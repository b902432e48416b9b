"""GCP/1 codec (drivers.gcp1.frames): the contract's hex examples, resynchronisation, and properties."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from drivers.gcp1.frames import (
    MAX_FRAME,
    Ack,
    AckResult,
    Barrier,
    Close,
    ControllerMessage,
    Display,
    Event,
    EventCode,
    Frame,
    FrameParser,
    HostMessage,
    Loops,
    Mode,
    Open,
    PayloadError,
    Ping,
    SetMode,
    Status,
    crc16,
    decode_controller,
    decode_host,
    encode,
    encode_frame,
)

# (wire bytes, seq, message, sent by the host?) — every example of contract §5
EXAMPLES: list[tuple[str, int, HostMessage | ControllerMessage, bool]] = [
    ("02 01 07 10 01 00 18 e1", 7, Open(0), True),
    ("02 01 07 80 02 07 00 3e 3a", 7, Ack(7, AckResult.OK), False),
    ("02 01 2a 90 01 01 d1 a5", 42, Event(EventCode.ARRIVED), False),
    ("02 01 00 81 03 00 01 00 36 0a", 0, Status(Barrier.CLOSED, Loops.A, Mode.NORMAL), False),
    ("02 01 2a 80 02 2a 00 8f 6c", 42, Ack(42), True),
    ("02 01 08 14 04 46 55 4c 4c ca be", 8, Display("FULL"), True),
]


def decode(frame: Frame, from_host: bool) -> HostMessage | ControllerMessage:
    return decode_host(frame) if from_host else decode_controller(frame)


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x4B37
    assert crc16(b"") == 0xFFFF


@pytest.mark.parametrize(("wire", "seq", "message", "from_host"), EXAMPLES)
def test_contract_examples_encode_and_decode(
    wire: str, seq: int, message: HostMessage | ControllerMessage, from_host: bool
) -> None:
    data = bytes.fromhex(wire)
    assert encode(1, seq, message) == data
    (frame,) = FrameParser().feed(data)
    assert (frame.addr, frame.seq, frame.cmd) == (1, seq, message.cmd)
    assert frame.encode() == data
    assert decode(frame, from_host) == message


def test_contract_examples_whole_byte_by_byte_and_all_at_once() -> None:
    stream = b"".join(bytes.fromhex(w) for w, *_ in EXAMPLES)
    expected = [(seq, msg) for _, seq, msg, _ in EXAMPLES]
    directions = [from_host for *_, from_host in EXAMPLES]

    def check(frames: list[Frame]) -> None:
        assert [(f.seq, decode(f, h)) for f, h in zip(frames, directions, strict=True)] == expected

    check(FrameParser().feed(stream))
    parser = FrameParser()
    check([f for b in stream for f in parser.feed(bytes((b,)))])
    assert parser.pending == 0
    parser = FrameParser()
    check([f for i in range(0, len(stream), 7) for f in parser.feed(stream[i : i + 7])])
    assert (parser.frames, parser.bad_crc, parser.bad_length, parser.skipped) == (6, 0, 0, 0)


def test_bad_crc_drops_the_stx_and_finds_the_next_frame() -> None:
    good = bytes.fromhex("02 01 07 10 01 00 18 e1")
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    parser = FrameParser()
    assert parser.feed(bytes(bad) + good) == [Frame(1, 7, 0x10, b"\x00")]
    assert parser.bad_crc == 1
    assert parser.skipped == len(bad)


def test_bad_length_drops_the_stx() -> None:
    parser = FrameParser()
    good = bytes.fromhex("02 01 2a 90 01 01 d1 a5")
    assert parser.feed(b"\x02\x01\x02\x03\x21" + good) == [Frame(1, 42, 0x90, b"\x01")]
    assert parser.bad_length == 1


def test_false_stx_holds_the_last_frame_until_the_line_goes_quiet() -> None:
    good = bytes.fromhex("02 01 07 80 02 07 00 3e 3a")
    parser = FrameParser()
    assert parser.feed(b"\x02\x01\x05\x80\x20" + good) == []  # a 32-byte candidate, not yet complete
    assert parser.drop_partial() == [Frame(1, 7, 0x80, b"\x07\x00")]
    assert parser.pending == 0
    assert parser.drop_partial() == []


@pytest.mark.parametrize(
    ("frame", "from_host"),
    [
        (Frame(1, 7, 0x80, b"\x07"), False),  # short ACK
        (Frame(1, 7, 0x80, b"\x06\x00"), False),  # acked seq differs from the frame's
        (Frame(1, 7, 0x80, b"\x07\x09"), False),  # unknown result
        (Frame(1, 0, 0x81, b"\x05\x00\x00"), False),  # unknown barrier state
        (Frame(1, 0, 0x81, b"\x00\x00\x03"), False),  # unknown mode
        (Frame(1, 0, 0x81, b"\x00\x00"), False),
        (Frame(1, 3, 0x90, b"\x09"), False),  # unknown event
        (Frame(1, 3, 0x90, b"\x08"), False),  # fault without its code
        (Frame(1, 3, 0x90, b"\x01\x05"), False),  # a code on a non-fault event
        (Frame(1, 3, 0x10, b"\x00"), False),  # OPEN is not a controller's
        (Frame(1, 3, 0x81, b"\x00\x00\x00"), True),  # STATUS is not a host's
        (Frame(1, 3, 0x10, b""), True),
        (Frame(1, 3, 0x11, b"\x00"), True),
        (Frame(1, 3, 0x12, b"\x07"), True),
        (Frame(1, 3, 0x14, b"\xff"), True),
        (Frame(1, 3, 0x14, b"\x01"), True),
        (Frame(1, 3, 0x01, b"\x00"), True),
        (Frame(1, 3, 0x42, b""), True),
    ],
)
def test_payloads_that_do_not_fit_are_payload_errors(frame: Frame, from_host: bool) -> None:
    with pytest.raises(PayloadError):
        decode(frame, from_host)


def test_encoders_refuse_values_out_of_range() -> None:
    with pytest.raises(ValueError):
        Open(256)
    with pytest.raises(ValueError):
        Display("x" * 33)
    with pytest.raises(ValueError):
        Display("PLÄTZE")
    with pytest.raises(ValueError):
        SetMode(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Event(EventCode.FAULT)
    with pytest.raises(ValueError):
        Event(EventCode.ARRIVED, 1)
    with pytest.raises(ValueError):
        encode_frame(256, 1, 0x10)
    with pytest.raises(ValueError):
        encode_frame(1, 1, 0x14, b"x" * 33)


def test_fault_event_and_loops() -> None:
    wire = encode(3, 200, Event(EventCode.FAULT, 17))
    (frame,) = FrameParser().feed(wire)
    assert decode_controller(frame) == Event(EventCode.FAULT, 17)
    (frame,) = FrameParser().feed(encode(3, 0, Status(Barrier.OPEN, Loops.A | Loops.B, Mode.LOCKED_OPEN)))
    status = decode_controller(frame)
    assert isinstance(status, Status) and status.vehicle_present and status.loops == Loops.A | Loops.B
    # bits past loop B are not ours to interpret
    assert decode_controller(Frame(3, 0, 0x81, b"\x00\xfc\x00")) == Status(Barrier.CLOSED, Loops.NONE, Mode.NORMAL)


# --- properties ------------------------------------------------------------------------------------------------

frames_st = st.builds(
    Frame,
    addr=st.integers(0, 255),
    seq=st.integers(0, 255),
    cmd=st.integers(0, 255),
    payload=st.binary(max_size=32),
)
host_messages = st.one_of(
    st.builds(Ack, st.integers(0, 255)),
    st.just(Ping()),
    st.builds(Open, st.integers(0, 255)),
    st.just(Close()),
    st.builds(SetMode, st.sampled_from(Mode)),
    st.builds(Display, st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=32)),
)
controller_messages = st.one_of(
    st.builds(Ack, st.integers(0, 255), st.sampled_from(AckResult)),
    st.builds(Status, st.sampled_from(Barrier), st.sampled_from(list(Loops)), st.sampled_from(Mode)),
    st.builds(Event, st.sampled_from([c for c in EventCode if c != EventCode.FAULT])),
    st.builds(Event, st.just(EventCode.FAULT), st.integers(0, 255)),
)


@given(st.integers(0, 255), st.integers(0, 255), host_messages)
def test_host_messages_round_trip(addr: int, seq: int, message: HostMessage) -> None:
    if isinstance(message, Ack):
        seq = message.acked_seq
    (frame,) = FrameParser().feed(encode(addr, seq, message))
    assert decode_host(frame) == message


@given(st.integers(0, 255), st.integers(0, 255), controller_messages)
def test_controller_messages_round_trip(addr: int, seq: int, message: ControllerMessage) -> None:
    if isinstance(message, Ack):
        seq = message.acked_seq
    (frame,) = FrameParser().feed(encode(addr, seq, message))
    assert decode_controller(frame) == message


@given(frames_st)
def test_decoders_raise_only_payload_errors(frame: Frame) -> None:
    for decoder in (decode_host, decode_controller):
        try:
            decoder(frame)
        except PayloadError:
            pass


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_arbitrary_bytes_never_raise_and_the_buffer_stays_bounded(chunks: list[bytes]) -> None:
    parser = FrameParser()
    for chunk in chunks:
        for frame in parser.feed(chunk):
            assert frame.encode() in b"".join(chunks)
        assert parser.pending < MAX_FRAME
    while parser.pending:
        parser.drop_partial()


# Noise is anything between frames: random bytes rich in STX (0x02) and small length bytes, truncated frames,
# frames with one byte changed. Each noise byte that is an STX starts a candidate frame; the parser rejects it
# (bad length or CRC) and rescans from the next byte, so noise cannot eat the real frame behind it — except when
# a candidate starting in the noise passes the CRC (1 in 65,536; a real line has the same odds). Such examples
# are excluded by `assume`, with that condition checked below directly on the bytes, not through the parser.
# A candidate still incomplete when the stream ends holds the frames behind it back until the line is quiet,
# which `drop_partial` (called by the link after an inter-byte gap) resolves.
noise_bytes = st.binary(max_size=24) | st.lists(st.sampled_from([0x02, 0x02, 0x00, 0x01, 0x05, 0x20, 0xFF])).map(bytes)


@st.composite
def noise_st(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "truncated", "corrupted"]))
    if kind == "bytes":
        return draw(noise_bytes)
    wire = draw(frames_st).encode()
    if kind == "truncated":
        return wire[: draw(st.integers(1, len(wire) - 1))]
    at = draw(st.integers(0, len(wire) - 1))
    flip = draw(st.integers(1, 255))
    return wire[:at] + bytes((wire[at] ^ flip,)) + wire[at + 1 :]


def false_frame_in_noise(stream: bytes, noise_positions: set[int]) -> bool:
    for p in noise_positions:
        if stream[p] != 0x02 or p + 4 >= len(stream) or stream[p + 4] > 32:
            continue
        end = p + 7 + stream[p + 4]
        if end <= len(stream):
            crc = crc16(stream[p + 1 : end - 2])
            if stream[end - 2 : end] == bytes((crc & 0xFF, crc >> 8)):
                return True
    return False


@given(
    st.lists(st.tuples(noise_st(), frames_st), max_size=12),
    noise_st(),
    st.lists(st.integers(0, 2000), max_size=30),
)
def test_frames_in_noise_are_all_recovered_in_order(
    segments: list[tuple[bytes, Frame]], tail: bytes, cuts: list[int]
) -> None:
    stream = bytearray()
    noise_positions: set[int] = set()
    for noise, frame in segments:
        noise_positions.update(range(len(stream), len(stream) + len(noise)))
        stream += noise + frame.encode()
    noise_positions.update(range(len(stream), len(stream) + len(tail)))
    stream += tail
    assume(not false_frame_in_noise(bytes(stream), noise_positions))

    parser = FrameParser()
    got: list[Frame] = []
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for a, b in itertools.pairwise(bounds):
        got += parser.feed(bytes(stream[a:b]))
    while parser.pending:
        got += parser.drop_partial()
    assert got == [frame for _, frame in segments]


def test_the_driver_and_the_simulator_import_neither_gateway_nor_each_other() -> None:
    root = Path(__file__).resolve().parent.parent
    forbidden = {"drivers/gcp1": ("gateway", "simulators"), "simulators/barrier": ("gateway", "drivers")}
    for package, banned in forbidden.items():
        files = list((root / package).rglob("*.py"))
        assert files, package
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    assert name.split(".")[0] not in banned, f"{path.relative_to(root)} imports {name}"
