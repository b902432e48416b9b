"""GCP/1, the serial gate-controller protocol of contract §5: codec, host link, serial transport.

Imports neither `gateway` nor `simulators`. Three modules:

- `frames`: sans-I/O. `crc16`, `encode(addr, seq, message)`, the resynchronising `FrameParser`, typed messages
  (`Open`, `Close`, `SetMode`, `Display`, `Ping`, `Ack`, `Status`, `Event`) and enums (`Barrier`, `Loops`, `Mode`,
  `EventCode`, `AckResult`).
- `link`: `GcpLink`, the host side for one serial port, and `Controller`, one per address on it.
- `transport`: `SerialPort` (pyserial-asyncio-fast, reopened with `Backoff` when the port vanishes).

Use (one link per `[[gates]] serial.port`; gates sharing a port share the link, by `address`):

    link = GcpLink("/dev/ttyUSB0", baudrate=9600)
    gate = link.add_controller(1, on_event=commit_event, on_online=gate_online, on_status=gate_status)
    await link.start()                    # returns at once; the port is opened (and reopened) in the background
    result = await gate.open_barrier(hold_s=0)   # AckResult.OK / BUSY / FAULT / REFUSED
    await gate.display("L1-042")
    ...
    await link.close()

Commands (`Controller.open_barrier`, `close_barrier`, `set_mode`, `display`, `command`) return the ACK's
`AckResult`. They raise `LinkDown` when the port is not open (or closes while waiting) and `NoAck` after the
first send and `retries` (3) resends of the same frame, same seq, `ack_timeout` (0.25 s) apart: both are
`GcpError`, which the lane turns into `gate.fault`. `ping()` returns the answering `Status`, or raises the same.
Commands to one controller go one at a time, in call order (a controller detects repeats against its last
command only), so send OPEN before DISPLAY. The host seq starts at a random 1..255 and wraps 255 -> 1.
`close_barrier()` returns REFUSED without sending while the latest STATUS shows a loop occupied (a belt;
guarantee 6 stays the lane's job, and the controller refuses too).

Callbacks, all run in the event loop:

- `on_event(event: Event) -> Awaitable[None]`: called once per controller EVENT, one at a time per controller,
  in arrival order. The link ACKs the event only after the handler returns, so the handler must return only
  once the event is committed (guarantee 3). A handler that raises gets no ACK: the controller resends it and
  it is delivered again. An event seq handled in the last `dedupe_window` (10 s) of connected time is a
  duplicate (same seq and payload): ACKed again, not delivered. A resend that arrives while its first copy is
  still in the handler is ignored; its ACK goes out when the handler returns. That memory does not survive a
  restart of the gateway: an event committed just before a crash and never ACKed is delivered again after it,
  so applying an event must be idempotent on the lane's side (e.g. "passed" for a session already confirmed).
- `on_online(online: bool) -> None`: True on the first good frame from the address and when it talks again;
  False after `offline_after` (3 s) without a good frame (also when nothing was heard in the first 3 s), and
  at once when the port vanishes. `gate.offline` / `gate.online` come from here.
- `on_status(status: Status) -> None`: every STATUS (every 1 s, and PING answers). Also kept as
  `Controller.status` with `status_at` (loop time); `Status.vehicle_present` is loop A or B.

State: `Controller.online`, `status`, `status_at`, `last_heard`; `GcpLink.connected`, `stats` (`LinkStats`:
bad CRCs, noise bytes, malformed frames, unknown addresses, resends, no-ACKs, duplicates, handler errors),
`port.opens` / `port.open_failures`. Every timer runs on the loop's monotonic clock. The callbacks `on_online`
and `on_status` must not block: schedule work (a task, a queue) for anything that commits.
"""

from drivers.gcp1.frames import (
    Ack,
    AckResult,
    Barrier,
    Close,
    Cmd,
    Display,
    Event,
    EventCode,
    Frame,
    FrameParser,
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
from drivers.gcp1.link import Controller, GcpError, GcpLink, LinkDown, LinkStats, NoAck
from drivers.gcp1.transport import Backoff, SerialPort

__all__ = [
    "Ack",
    "AckResult",
    "Backoff",
    "Barrier",
    "Close",
    "Cmd",
    "Controller",
    "Display",
    "Event",
    "EventCode",
    "Frame",
    "FrameParser",
    "GcpError",
    "GcpLink",
    "LinkDown",
    "LinkStats",
    "Loops",
    "Mode",
    "NoAck",
    "Open",
    "PayloadError",
    "Ping",
    "SerialPort",
    "SetMode",
    "Status",
    "crc16",
    "decode_controller",
    "decode_host",
    "encode",
    "encode_frame",
]
