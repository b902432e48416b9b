"""Small builders shared by the core tests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import jsonschema

from gateway.config import GatewayConfig, parse_config
from gateway.core.clock import SYSTEM_CLOCK, Clock
from gateway.core.plates import PlateKey
from gateway.store.schema import connect, db_path
from gateway.store.writer import Writer

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "docs" / "schemas"
# The exported files, not the models: integrators validate against what is published.
EVENTS_SCHEMA = jsonschema.Draft202012Validator(
    json.loads((SCHEMAS / "events.schema.json").read_text()), format_checker=jsonschema.FormatChecker()
)


def lot_config(
    state_dir: Path,
    *,
    slots: int = 10,
    extra_slots: str = "",
    extra: str = "",
    anti_passback: str = "hard",
    synchronous: str = "FULL",
    permits: str = "",
) -> GatewayConfig:
    width = max(3, len(str(slots)))
    last = str(slots).zfill(width)
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{state_dir}"
[broker]
allow_anonymous = true
[policy]
anti_passback = "{anti_passback}"
[store]
synchronous = "{synchronous}"
[access]
deny = ["XX999XX"]
permits = [{permits}]
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-{"1".zfill(width)}..A-{last}" }}{extra_slots}]
{extra}
"""
    )


def new_writer(cfg: GatewayConfig, clock: Clock = SYSTEM_CLOCK) -> Writer:
    return Writer(db_path(cfg.state_path()), cfg, PlateKey(b"k" * 32), clock=clock)


def reader(cfg: GatewayConfig) -> sqlite3.Connection:
    return connect(db_path(cfg.state_path()), readonly=True)


def spawn_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`python -m gateway run` in its own process, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a clean stop), SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
