"""Smoke runs of the benches with tiny numbers: they still start the real pieces, measure and check what they
check (a drain that is not complete and in order exits non-zero; allocation's raw baseline must run the writer's
statements). No time is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.allocation import check_same_sql

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed (.ci/run installs it)",
)


def run_bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_lane_bench_smoke() -> None:
    out = run_bench("bench.lane", "--entries", "3", "--block", "3", "--warmup", "1", "--rate", "200")
    rows = [line for line in out.splitlines() if line.startswith("| baseline") or line.startswith("| gateway")]
    assert len(rows) == 4
    assert "7 sessions confirmed" in out  # 1 warm-up + 3 idle + 3 under load, each passed the loops


def test_drain_bench_smoke() -> None:
    out = run_bench("bench.drain", "--events", "300", "--repeat", "1", "--live-seconds", "0.5")
    assert out.count("| raw QoS 1 publish loop") == 2
    assert out.count("| forwarder drain of the backlog") == 1
    assert "complete and in order |" in out.splitlines()[-1]


async def test_allocation_bench_raw_baseline_runs_the_writers_statements(tmp_path: Path) -> None:
    # A change to what the writer executes for an entry or an exit must reach the raw baseline, or writer/raw
    # stops meaning "our layer around the same SQL" (and the bench refuses to run).
    assert await check_same_sql(tmp_path) > 30


def test_accuracy_bench_several_seeds(tmp_path: Path) -> None:
    out = run_bench(
        "bench.accuracy", "--hours", "0.1", "--slots", "50", "--seeds", "1-2", "--json", str(tmp_path / "a.json")
    )
    rows = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    results = json.loads((tmp_path / "a.json").read_text())
    assert sorted(results) == ["1", "2"]
    assert all(r["samples"] == 360 and r["messages_sent"] > 0 for r in results.values())
    assert all(r["lot_changes"] > 0 and r["lot_converge_p99_s"] >= 0 for r in results.values())


def test_accuracy_bench_debug_diagnoses_the_wrong_slots(tmp_path: Path) -> None:
    run_bench("bench.accuracy", "--hours", "10", "--slots", "50", "--debug", "--json", str(tmp_path / "d.json"))
    result = json.loads((tmp_path / "d.json").read_text())
    assert result["exact"] < 1  # a morning of misparks: some samples are off, so some zone's count is
    wrong = {k: v for k, v in result["diagnosis"].items() if not k.startswith("move ")}
    zones = result["diagnosis_zones"]
    assert zones and all(0 < n <= wrong[kind] for kind, n in zones.items())
