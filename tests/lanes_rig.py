"""A gateway with two barrier lanes on real pseudo-terminals (simulated controllers) and cameras over MQTT."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.core.clock import ManualClock
from gateway.store.audit import audit
from simulators.barrier import BarrierSim, BarrierState, Command, Timings
from tests.conftest import free_port
from tests.gcp1_helpers import until
from tests.harness import Observer, R, observer, running
from tests.helpers import reader

# Fast barriers; the controller's hold outlasts a test step so that a car always finds the barrier open.
TIMINGS = Timings(opening=0.02, closing=0.02, hold=0.5, dwell=0.01, status_interval=0.2, event_resend=0.1)
HOUR = 3600.0


def lane_config(tmp: Path, port: int, **kw: Any) -> GatewayConfig:
    return parse_config(lane_toml(tmp, port, **kw))


def lane_toml(
    tmp: Path, port: int, *, slots: int = 3, policy: str = "deny", pass_timeout: float = 30, tariff: str = ""
) -> str:
    """A lot of `slots` standard slots and one EV slot, an entry lane in1 and an exit lane out1 (serial ports
    `tmp/ttyIN1`, `tmp/ttyOUT1`), the embedded broker on `port` open to the tests' anonymous clients."""
    acl = tmp / "anonymous.acl"
    acl.write_text("topic readwrite #\n")
    tariff = tariff or "free_minutes = 15\nper_hour = 250"
    return f"""
[gateway]
id = "gw1"
state_dir = "{tmp / "state"}"
[broker]
embedded = true
port = {port}
allow_anonymous = true
acl_file = "{acl}"
[timing]
pass_timeout = {pass_timeout}
reread_window = 30
[policy]
exit_unpaid = "{policy}"
[access]
restricted_types = ["ev"]
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-{slots:03d}" }}, {{ ids = "A-EV1", type = "ev" }}]
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
camera = "cam-in1"
serial = {{ port = "{tmp / "ttyIN1"}", address = 1 }}
[[gates]]
id = "out1"
lot = "lot1"
direction = "exit"
camera = "cam-out1"
serial = {{ port = "{tmp / "ttyOUT1"}", address = 1 }}
[[tariffs]]
lot = "lot1"
currency = "EUR"
{tariff}
"""


@dataclass
class Lanes:
    gw: Gateway
    obs: Observer
    clock: ManualClock
    entry: BarrierSim
    exit: BarrierSim
    cfg: GatewayConfig

    def events(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        return self.obs.events(type_, **match)

    async def wait_event(self, type_: str, count: int = 1, **match: Any) -> list[dict[str, Any]]:
        return await self.obs.wait_event(type_, count, **match)

    async def read(self, camera: str, plate: str, **extra: Any) -> None:
        await self.obs.pub(f"cameras/{camera}/reads", {"event_id": uuid.uuid4().hex, "plate": plate, **extra})

    async def request(self, verb: str, **body: Any) -> dict[str, Any]:
        return await self.obs.request(verb, body)

    def gate_state(self, gate: str) -> dict[str, Any] | None:
        state: dict[str, Any] | None = self.obs.state(f"{R}/gates/{gate}")
        return state

    async def arrive_and_read(self, sim: BarrierSim, camera: str, plate: str) -> None:
        """A car drives onto loop A and the camera reads its plate."""
        sim.vehicle_arrives()
        await self.read(camera, plate)

    async def enter(self, plate: str) -> dict[str, Any]:
        """A car through the entry lane: arrive, read, the barrier opens, the car passes, confirmed."""
        before = len(self.events("session.started"))
        await self.arrive_and_read(self.entry, "cam-in1", plate)
        started = (await self.wait_event("session.started", count=before + 1))[-1]
        await until(lambda: self.entry.barrier == BarrierState.OPEN)
        await self.entry.vehicle_passes()
        await self.wait_event("session.confirmed", session_id=started["session_id"])
        return started

    @staticmethod
    def executed(sim: BarrierSim, cmd: int) -> list[Command]:
        """The commands of kind `cmd` the controller executed (not repeats)."""
        return [c for c in sim.commands if c.cmd == cmd and c.outcome == "executed"]


@contextlib.asynccontextmanager
async def lanes(tmp_path: Path, **kw: Any) -> AsyncIterator[Lanes]:
    port = free_port()
    cfg = lane_config(tmp_path, port, **kw)
    clock = ManualClock(wall=1_800_000_000.0)
    entry = BarrierSim(tmp_path / "ttyIN1", timings=TIMINGS)
    exit_ = BarrierSim(tmp_path / "ttyOUT1", timings=TIMINGS)
    await entry.start()
    await exit_.start()
    try:
        async with running(cfg, clock=clock) as gw, observer(port) as obs:
            await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
            rig = Lanes(gw, obs, clock, entry, exit_, cfg)
            await obs.wait_for(
                lambda: all((rig.gate_state(g) or {}).get("barrier") == "closed" for g in ("in1", "out1"))
            )
            yield rig
    finally:
        await entry.close()
        await exit_.close()
    conn = reader(cfg)
    try:
        assert audit(conn) == []
    finally:
        conn.close()
