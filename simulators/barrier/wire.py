"""The simulator's own GCP/1 framing, written from contract §5 alone.

Deliberately not `drivers.gcp1.frames`: a bitwise CRC instead of a table, a byte-at-a-time deframer instead of a
buffer scan, so that a misreading of the contract in one shows up as a disagreement with the other in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

STX = 0x02
MAX_LEN = 32

# commands, by direction
HOST_ACK = CTRL_ACK = 0x80
PING = 0x01
OPEN = 0x10
CLOSE = 0x11
SET_MODE = 0x12
DISPLAY = 0x14
STATUS = 0x81
EVENT = 0x90

# ACK results
OK, BUSY, FAULT, REFUSED = 0, 1, 2, 3

# event codes
ARRIVED, BACKED_OUT, PASSED, OPENED, CLOSED, FORCED_OPEN, TICKET, FAULTED = range(1, 9)


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            lsb = crc & 1
            crc >>= 1
            if lsb:
                crc ^= 0xA001
    return crc


def frame(addr: int, seq: int, cmd: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_LEN:
        raise ValueError("payload too long")
    inner = bytes([addr & 0xFF, seq & 0xFF, cmd & 0xFF, len(payload)]) + payload
    crc = crc16_modbus(inner)
    return bytes([STX]) + inner + crc.to_bytes(2, "little")


@dataclass(frozen=True)
class Received:
    addr: int
    seq: int
    cmd: int
    payload: bytes


class Deframer:
    """Byte-at-a-time: hunt for STX, collect header and body, check the CRC; on a failure replay what came
    after the STX (the contract's "drop the STX byte and scan for the next STX")."""

    def __init__(self) -> None:
        self._candidate = bytearray()
        self.rejected = 0

    def push(self, data: bytes) -> list[Received]:
        out: list[Received] = []
        todo = bytearray(data)
        pos = 0
        while pos < len(todo):
            byte = todo[pos]
            pos += 1
            cand = self._candidate
            if not cand:
                if byte == STX:
                    cand.append(byte)
                continue
            cand.append(byte)
            if len(cand) < 5:
                continue
            size = 7 + cand[4]
            if cand[4] <= MAX_LEN and len(cand) < size:
                continue
            if cand[4] <= MAX_LEN and int.from_bytes(cand[-2:], "little") == crc16_modbus(bytes(cand[1:-2])):
                out.append(Received(cand[1], cand[2], cand[3], bytes(cand[5:-2])))
                cand.clear()
                continue
            self.rejected += 1
            todo = cand[1:] + todo[pos:]
            pos = 0
            cand.clear()
        return out
