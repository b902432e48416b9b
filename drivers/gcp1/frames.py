"""GCP/1 frames, sans-I/O (contract §5): CRC-16/MODBUS, a resynchronising parser, typed messages.

Wire: `STX 0x02 | addr | seq | cmd | len | payload[len ≤ 32] | crc16 lo | crc16 hi`, the CRC over addr..payload.
Nothing here does I/O or keeps time; `drivers.gcp1.link` does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar, TypeVar

__all__ = [
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "STX",
    "Ack",
    "AckResult",
    "Barrier",
    "Close",
    "Cmd",
    "ControllerMessage",
    "Display",
    "Event",
    "EventCode",
    "Frame",
    "FrameParser",
    "HostMessage",
    "Loops",
    "Mode",
    "Open",
    "PayloadError",
    "Ping",
    "SetMode",
    "Status",
    "crc16",
    "decode_controller",
    "decode_host",
    "encode",
    "encode_frame",
]

STX = 0x02
MAX_PAYLOAD = 32
_HEADER = 5  # STX addr seq cmd len
MAX_FRAME = _HEADER + MAX_PAYLOAD + 2
_STX_BYTE = b"\x02"


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF): `crc16(b"123456789") == 0x4B37`."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


class Cmd(IntEnum):
    PING = 0x01
    OPEN = 0x10
    CLOSE = 0x11
    SET_MODE = 0x12
    DISPLAY = 0x14
    ACK = 0x80
    STATUS = 0x81
    EVENT = 0x90


class AckResult(IntEnum):
    """The `result` of an ACK. REFUSED: CLOSE while a loop is occupied (or the driver's own belt, see link)."""

    OK = 0
    BUSY = 1
    FAULT = 2
    REFUSED = 3


class Barrier(IntEnum):
    CLOSED = 0
    OPENING = 1
    OPEN = 2
    CLOSING = 3
    FAULT = 4


class Mode(IntEnum):
    NORMAL = 0
    LOCKED_OPEN = 1
    LOCKED_CLOSED = 2


class Loops(IntFlag):
    """STATUS `loops`: bit 0 loop A (before the barrier), bit 1 loop B (past it)."""

    NONE = 0
    A = 1
    B = 2


class EventCode(IntEnum):
    ARRIVED = 1
    BACKED_OUT = 2
    PASSED = 3
    OPENED = 4
    CLOSED = 5
    FORCED_OPEN = 6
    TICKET = 7
    FAULT = 8


class PayloadError(ValueError):
    """A frame with a good CRC whose cmd or payload does not fit the contract."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One checked frame; `cmd` stays an int so that an unknown command is still a frame."""

    addr: int
    seq: int
    cmd: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode_frame(self.addr, self.seq, self.cmd, self.payload)


def encode_frame(addr: int, seq: int, cmd: int, payload: bytes = b"") -> bytes:
    """The wire bytes of one frame, STX to CRC; ValueError for a field out of range."""
    if not (0 <= addr <= 255 and 0 <= seq <= 255 and 0 <= cmd <= 255):
        raise ValueError(f"addr, seq and cmd are bytes: {addr}, {seq}, {cmd}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes, at most {MAX_PAYLOAD}")
    body = bytes((addr, seq, cmd, len(payload))) + payload
    crc = crc16(body)
    return _STX_BYTE + body + bytes((crc & 0xFF, crc >> 8))


class FrameParser:
    """Incremental frame parser: `feed(bytes) -> list[Frame]`; never raises, keeps < `MAX_FRAME` bytes.

    On a bad length or a bad CRC it drops that STX byte only and scans on from the next byte, so a false
    STX in noise cannot swallow the real frame behind it (unless its candidate frame passes the CRC).
    Between calls the buffer is empty or holds one incomplete candidate starting at STX.
    """

    __slots__ = ("_buf", "bad_crc", "bad_length", "frames", "skipped")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.frames = 0
        self.bad_crc = 0
        self.bad_length = 0
        self.skipped = 0  # bytes discarded: noise, dropped STX bytes, expired partial frames

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        buf = self._buf
        buf += data
        out: list[Frame] = []
        n = len(buf)
        i = 0
        while True:
            start = buf.find(_STX_BYTE, i)
            if start < 0:
                self.skipped += n - i
                i = n
                break
            self.skipped += start - i
            i = start
            if n - i < _HEADER:
                break
            length = buf[i + 4]
            if length > MAX_PAYLOAD:
                self.bad_length += 1
                self.skipped += 1
                i += 1
                continue
            end = i + _HEADER + length + 2
            if end > n:
                break
            crc = crc16(memoryview(buf)[i + 1 : end - 2])
            if buf[end - 2] != crc & 0xFF or buf[end - 1] != crc >> 8:
                self.bad_crc += 1
                self.skipped += 1
                i += 1
                continue
            out.append(Frame(buf[i + 1], buf[i + 2], buf[i + 3], bytes(buf[i + _HEADER : end - 2])))
            self.frames += 1
            i = end
        del buf[:i]
        return out

    def clear(self) -> None:
        """Forget a partial frame (the port was reopened: its bytes will never be completed)."""
        self.skipped += len(self._buf)
        self._buf.clear()

    def drop_partial(self) -> list[Frame]:
        """The line went quiet inside a candidate frame: drop its STX and rescan what followed it.

        Without this a false STX in noise just before the last frame of a burst would hold that frame
        back until more bytes arrive (the link calls this after an inter-byte gap).
        """
        if not self._buf:
            return []
        del self._buf[0]
        self.skipped += 1
        return self.feed(b"")


# --- typed messages -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """ACK, both directions: the frame's seq is `acked_seq`. A host ACK of an EVENT has result OK."""

    cmd: ClassVar[Cmd] = Cmd.ACK
    acked_seq: int
    result: AckResult = AckResult.OK

    def payload(self) -> bytes:
        return bytes((self.acked_seq, self.result))


@dataclass(frozen=True, slots=True)
class Ping:
    cmd: ClassVar[Cmd] = Cmd.PING

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Open:
    """OPEN; `hold_s` 0 means the controller's default hold."""

    cmd: ClassVar[Cmd] = Cmd.OPEN
    hold_s: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.hold_s <= 255:
            raise ValueError(f"hold_s is a byte, not {self.hold_s}")

    def payload(self) -> bytes:
        return bytes((self.hold_s,))


@dataclass(frozen=True, slots=True)
class Close:
    cmd: ClassVar[Cmd] = Cmd.CLOSE

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class SetMode:
    cmd: ClassVar[Cmd] = Cmd.SET_MODE
    mode: Mode

    def __post_init__(self) -> None:
        Mode(self.mode)  # ValueError for anything but the three modes

    def payload(self) -> bytes:
        return bytes((self.mode,))


@dataclass(frozen=True, slots=True)
class Display:
    """DISPLAY: the lane sign's text, printable ASCII, at most 32 characters."""

    cmd: ClassVar[Cmd] = Cmd.DISPLAY
    text: str

    def __post_init__(self) -> None:
        if len(self.text) > MAX_PAYLOAD or not all(" " <= c <= "~" for c in self.text):
            raise ValueError(f"sign text must be printable ASCII of at most {MAX_PAYLOAD} characters: {self.text!r}")

    def payload(self) -> bytes:
        return self.text.encode("ascii")


@dataclass(frozen=True, slots=True)
class Status:
    cmd: ClassVar[Cmd] = Cmd.STATUS
    barrier: Barrier
    loops: Loops
    mode: Mode

    @property
    def vehicle_present(self) -> bool:
        """Loop A or loop B occupied (`vehicle_present` of `R/gates/<gate>`)."""
        return bool(self.loops)

    def payload(self) -> bytes:
        return bytes((self.barrier, self.loops, self.mode))


@dataclass(frozen=True, slots=True)
class Event:
    """A controller EVENT; `fault_code` is set for FAULT only. `seq` is the frame's (0 for one built by hand): the
    host keeps it to recognise a redelivery after its own restart; it is not part of the event's value."""

    cmd: ClassVar[Cmd] = Cmd.EVENT
    code: EventCode
    fault_code: int | None = None
    seq: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if (self.code == EventCode.FAULT) != (self.fault_code is not None):
            raise ValueError("a fault code comes with a FAULT event, and only with it")
        if self.fault_code is not None and not 0 <= self.fault_code <= 255:
            raise ValueError(f"fault code is a byte, not {self.fault_code}")

    def payload(self) -> bytes:
        return bytes((self.code,)) if self.fault_code is None else bytes((self.code, self.fault_code))


HostMessage = Ack | Ping | Open | Close | SetMode | Display
ControllerMessage = Ack | Status | Event


def encode(addr: int, seq: int, message: HostMessage | ControllerMessage) -> bytes:
    """The wire bytes of `message` to or from the controller at `addr`."""
    return encode_frame(addr, seq, message.cmd, message.payload())


_E = TypeVar("_E", bound=IntEnum)


def _enum(kind: type[_E], value: int, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise PayloadError(f"unknown {what} {value}") from None


def _length(frame: Frame, *allowed: int) -> None:
    if len(frame.payload) not in allowed:
        raise PayloadError(f"cmd 0x{frame.cmd:02x} with a payload of {len(frame.payload)} bytes")


def _decode_ack(frame: Frame) -> Ack:
    _length(frame, 2)
    acked, result = frame.payload
    if acked != frame.seq:
        raise PayloadError(f"ACK in frame seq {frame.seq} acknowledges seq {acked}")
    return Ack(acked, _enum(AckResult, result, "ACK result"))


def decode_controller(frame: Frame) -> ControllerMessage:
    """A frame sent by a controller as a typed message; PayloadError when it does not fit §5."""
    cmd = frame.cmd
    p = frame.payload
    if cmd == Cmd.ACK:
        return _decode_ack(frame)
    if cmd == Cmd.STATUS:
        _length(frame, 3)
        return Status(_enum(Barrier, p[0], "barrier state"), Loops(p[1] & 0x03), _enum(Mode, p[2], "mode"))
    if cmd == Cmd.EVENT:
        _length(frame, 1, 2)
        code = _enum(EventCode, p[0], "event code")
        if (code == EventCode.FAULT) != (len(p) == 2):
            raise PayloadError(f"event {code.name} with a payload of {len(p)} bytes")
        return Event(code, p[1] if len(p) == 2 else None, seq=frame.seq)
    raise PayloadError(f"cmd 0x{cmd:02x} is not sent by a controller")


def decode_host(frame: Frame) -> HostMessage:
    """A frame sent by the host as a typed message; PayloadError when it does not fit §5."""
    cmd = frame.cmd
    p = frame.payload
    if cmd == Cmd.ACK:
        return _decode_ack(frame)
    if cmd == Cmd.PING:
        _length(frame, 0)
        return Ping()
    if cmd == Cmd.OPEN:
        _length(frame, 1)
        return Open(p[0])
    if cmd == Cmd.CLOSE:
        _length(frame, 0)
        return Close()
    if cmd == Cmd.SET_MODE:
        _length(frame, 1)
        return SetMode(_enum(Mode, p[0], "mode"))
    if cmd == Cmd.DISPLAY:
        try:
            return Display(p.decode("ascii"))
        except ValueError as e:  # UnicodeDecodeError is one
            raise PayloadError(f"DISPLAY text: {e}") from None
    raise PayloadError(f"cmd 0x{cmd:02x} is not sent by a host")
