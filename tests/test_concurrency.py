"""Thousands of concurrent entries against one lot: exactly one session per slot, the rest refused `full`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from gateway.core.domain import Enter
from tests.helpers import lot_config, new_writer


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


async def test_2000_concurrent_enters_on_1000_slots(tmp_path: Path) -> None:
    cfg = lot_config(tmp_path / "state", slots=1000)
    writer = new_writer(cfg)
    task = asyncio.create_task(writer.run())
    await writer.wait_ready()
    try:
        replies = await asyncio.gather(*(writer.submit(Enter(vehicle=f"CAR{i:05d}", lot="lot1")) for i in range(2400)))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ok = [r for r in replies if r.ok]
    assert len(ok) == 1000
    assert sorted(str(r.code) for r in replies if not r.ok) == ["full"] * 1400
    assert len({r.data["slot"] for r in ok}) == 1000
    assert writer.commits < writer.commands  # they were group-committed

    config_file = tmp_path / "gw.toml"
    config_file.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "{cfg.state_path()}"\n[broker]\nallow_anonymous = true\n'
        '[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{ ids = "A-0001..A-1000" }]\n'
    )
    audit = await asyncio.to_thread(_cli, "audit", "--config", str(config_file))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    status = await asyncio.to_thread(_cli, "status", "--json", "--config", str(config_file))
    assert status.returncode == 0, status.stderr
    assert '"available": 0' in status.stdout and '"occupied": 1000' in status.stdout
