"""The injectable clock: timers run on monotonic time, records on wall time, and a wall-clock step moves no timer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.core.clock import ManualClock
from tests.conftest import MosquittoProcess
from tests.harness import R, observer, running, site_config


async def test_manual_clock_wakes_sleepers_in_order_and_jumps_only_the_wall() -> None:
    clock = ManualClock(wall=1_000.0, monotonic=5.0)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 10)), asyncio.create_task(sleeper("early", 2))]
    await asyncio.sleep(0)
    clock.jump(-7200)
    await asyncio.sleep(0)
    assert woke == [] and clock.wall() == 1_000.0 - 7200 and clock.monotonic() == 5.0
    clock.advance(2)
    await asyncio.sleep(0)
    assert woke == ["early"]
    clock.advance(8)
    await asyncio.gather(*tasks)
    assert woke == ["early", "late"] and clock.wall() == 1_000.0 - 7200 + 10


async def test_debounce_runs_on_the_gateways_clock_not_the_wall(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    clock = ManualClock()
    cfg = site_config(tmp_path / "state", port=mosquitto.port, embedded=False)
    async with running(cfg, clock=clock) as gw, observer(mosquitto.port) as obs:
        await obs.wait_for(lambda: obs.state(f"{R}/status") == "online")
        await obs.pub("sensors/A-004/state", {"occupied": True, "seq": 1})
        await obs.wait_for(lambda: gw.ingress.verdicts["accepted"] == 1)
        clock.jump(3 * 3600)  # NTP steps the wall clock: no timer may fire for it
        await asyncio.sleep(0.3)  # real time passes too: the debounce (0.2 s) must not count it
        assert not obs.events("slot.status")
        clock.advance(0.1)
        await asyncio.sleep(0.1)
        assert not obs.events("slot.status")
        clock.jump(-5 * 3600)
        clock.advance(0.1)  # 0.2 s on the gateway's clock since the report
        status = await obs.wait_for(lambda: obs.events("slot.status"))
        assert status[0]["slot"] == "A-004" and status[0]["status"] == "occupied"
        # Records carry the wall time, jumps included.
        assert status[0]["ts"].startswith("2027-01-15")
