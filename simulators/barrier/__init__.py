"""A simulated GCP/1 barrier controller on a pseudo-terminal pair (contract §5), for tests, the demo and `simulate`.

It shares nothing with `gateway` or `drivers`, only the contract: `simulators.barrier.wire` is its own frame
encoder and decoder, written on purpose apart from `drivers.gcp1.frames` so that the two cross-check each other.

    sim = BarrierSim(tmp / "ttyGATE1", address=1, timings=Timings(hold=0.3))
    await sim.start()                  # the pty's slave is reachable at tmp/ttyGATE1 (a symlink)
    sim.vehicle_arrives()              # loop A on, EVENT arrived (resent every 500 ms until ACKed)
    await sim.vehicle_passes()         # needs the barrier OPEN: over A and B, EVENT passed; closes after hold
    sim.unplug(); sim.replug()         # the pty closed, a new one at the same path
    [c for c in sim.commands if c.cmd == wire.CLOSE and (c.loop_a or c.loop_b)]   # what the host sent, when
    await sim.close()

Behaviour: OPEN opens (`timings.opening`), holds (`hold_s`, or `timings.hold` for 0), closes by itself once the
hold is over and the loops are clear, again `hold` after a vehicle passed; a vehicle on a loop while closing
reverses the barrier. CLOSE is refused (ACK 3) while a loop is occupied or in locked-open mode; OPEN is refused
in locked-closed mode; any command in FAULT gets ACK 2, as does a malformed payload. The same seq, cmd and
payload as the last executed command within 2 s is a repeat: ACKed again with the first result, not executed.
STATUS (seq 0) every `timings.status_interval`; EVENTs resent every `timings.event_resend` until ACKed, on
the controller's own seq 1..255, `events_in_flight` (1) at a time so they keep their order; PING answered by a
STATUS with its seq. Several controllers can share one `PtyLine` (multi-drop, by address). `Noise` injects
garbage, corrupted and truncated frames, and losses on the way in; `drop_acks(n)` / `lose_host_acks(n)` lose
exact frames. `BarrierFleet(directory, n)` starts n controllers, each on its own pty, and returns their paths
(`names=` instead: one per name, e.g. gate id, at `directory/<name>`); `await sim.wait_until(lambda: ...)` waits
for the barrier or the host without polling.
"""

from simulators.barrier.controller import (
    STREET_TIMINGS,
    BarrierFleet,
    BarrierSim,
    BarrierState,
    Command,
    GateMode,
    Noise,
    SentEvent,
    SimError,
    Timings,
)
from simulators.barrier.line import PtyLine

__all__ = [
    "STREET_TIMINGS",
    "BarrierFleet",
    "BarrierSim",
    "BarrierState",
    "Command",
    "GateMode",
    "Noise",
    "PtyLine",
    "SentEvent",
    "SimError",
    "Timings",
]
