"""`parking-gateway demo` and `simulate` as a user runs them, and the live view against a real broker."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.demo.run import choose_port
from gateway.demo.view import CLEAR_HOME, LiveView
from gateway.mqtt.broker import BrokerStartError
from simulators import make_client
from tests.conftest import MosquittoProcess, free_port
from tests.harness import R, observer

DEMO_SLOTS = 120
SUMMARY = re.compile(r"cars: (\d+) arrived, (\d+) entered, (\d+) left, (\d+) denied")
LOWEST = re.compile(r"availability lot1: (\d+)/(\d+) available.*\(lowest available seen: (\d+)\)")
GATE = re.compile(r"gate (\S+): opened (once|\d+ times), closed (once|\d+ times) \((\d+) OPENs")
DEMO_GATES = {"in1", "in2", "out1", "out2"}


def demo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "demo", "--port", str(free_port()), *args]


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """What the process printed until `marker` appeared; fails the test if it never does."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in the output: {seen!r}"
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"output ended without {marker!r}: {seen!r}"
                seen += chunk
    return seen


def times(text: str) -> int:
    return 1 if text == "once" else int(text.split()[0])


def check_summary(out: str) -> tuple[int, int]:
    """(cars entered, lowest availability seen) from the final summary."""
    assert "demo summary" in out
    cars, low = SUMMARY.search(out), LOWEST.search(out)
    assert cars is not None and low is not None, out
    assert int(low[2]) == DEMO_SLOTS
    return int(cars[2]), int(low[3])


def test_demo_runs_for_its_duration_and_stops_cleanly() -> None:
    # 20 s: the first cars leave after about 12 s, so that the exits' barriers have served cars too.
    res = subprocess.run(demo_cmd("--duration", "20"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    # Not a terminal: plain lines, never escape codes.
    assert "\x1b" not in res.stdout
    assert "gateway=online" in res.stdout
    entered, lowest = check_summary(res.stdout)
    assert entered > 0
    assert lowest < DEMO_SLOTS
    # Some cars booked ahead (a visit outlasts these 8 s: payments and revenue are the view's test's).
    booked = re.search(r"reservations: (\d+) booked .*pay station: (\d+) paid", res.stdout)
    assert booked is not None and int(booked[1]) > 0, res.stdout
    assert "revenue so far:" in res.stdout
    # Every gate's barrier is a simulated controller on a pty that the gateway drove over GCP/1: each opened and
    # closed (the attendant opens each once at the start; cars through the entries, and later the exits).
    gates = {m[1]: (times(m[2]), times(m[3]), int(m[4])) for m in GATE.finditer(res.stdout)}
    assert set(gates) == DEMO_GATES, res.stdout
    assert all(opened >= 1 and closed >= 1 and opens >= 1 for opened, closed, opens in gates.values()), gates
    through = re.search(r"barriers: (\d+) cars in and (\d+) out through them", res.stdout)
    assert through is not None and int(through[1]) > 0, res.stdout
    frames = re.search(r"(\d+) serial frames", res.stdout)
    assert frames is not None and int(frames[1]) > 0
    assert re.search(r"gates in1 \w+ \d+/\d+, in2", res.stdout)  # the plain lines show the gates too
    store = re.search(r"store (\S+) \(temporary\)", res.stdout)
    assert store is not None and not Path(store[1]).exists()


def test_demo_stops_on_sigint_and_keeps_a_given_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        demo_cmd("--state-dir", str(state)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        started = time.monotonic()
        seen = read_until(proc, b"gateway=online", timeout=30)
        time.sleep(max(0.0, 4.0 - (time.monotonic() - started)))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (seen + out).decode()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in text + err.decode()
    entered, _ = check_summary(text)
    assert entered > 0
    assert (state / "gateway.db").exists()


def test_demo_reports_a_busy_port_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--duration", "5", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert f"port {port}" in res.stderr and "in use" in res.stderr


def test_choose_port_prefers_request_then_config_then_a_free_port() -> None:
    free = free_port()
    assert choose_port("127.0.0.1", 1883, free) == (free, "--port")
    assert choose_port("127.0.0.1", free, None)[0] == free
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        port, why = choose_port("127.0.0.1", taken, None)
        with pytest.raises(BrokerStartError, match="already in use"):
            choose_port("127.0.0.1", 1883, taken)
    assert port != taken and f"{taken} is in use" in why


def test_simulate_subcommand_publishes_to_a_broker(mosquitto: MosquittoProcess) -> None:
    args = ["simulate", "--port", str(mosquitto.port), *"--sensors 3 --rate 20 --duration 1".split()]
    res = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["published"] > 3


async def test_view_follows_the_gateway_topics(mosquitto: MosquittoProcess) -> None:
    root = "parking/demo"
    availability = {
        "lot": "lot1",
        "total": 4,
        "available": 1,
        "occupied": 2,
        "reserved": 1,
        "blocked": 0,
        "zones": {"A": {"total": 4, "available": 1, "occupied": 2, "reserved": 1, "blocked": 0}},
        "types": {"ev": {"total": 1, "available": 0, "occupied": 1, "reserved": 0, "blocked": 0}},
    }
    events = [
        {"seq": 1, "type": "session.started", "slot": "A-1", "gate": "in1", "reservation_id": None},
        {"seq": 2, "type": "entry.denied", "gate": "in1", "reason": "full"},
        {"seq": 5, "type": "alert", "code": "device.unknown", "subject": {"device": "x9"}},
    ]
    out = io.StringIO()
    view = LiveView(root, out, tty=False)
    async with make_client("127.0.0.1", mosquitto.port, "view-test-pub") as pub:
        await pub.publish(f"{root}/status", b"online", qos=1, retain=True)
        await pub.publish(f"{root}/lots/lot1/availability", json.dumps(availability).encode(), qos=1, retain=True)
        async with make_client("127.0.0.1", mosquitto.port, "view-test-sub") as sub:
            async with asyncio.TaskGroup() as tg:
                follow = tg.create_task(view.follow(sub))
                async with asyncio.timeout(10):
                    await view.online.wait()
                    for e in events:
                        await pub.publish(f"{root}/events", json.dumps(e).encode(), qos=1)
                    await pub.publish(f"{root}/events", b"{not json", qos=1)
                    # The view has no per-message signal; the malformed one came last on this connection.
                    while view.invalid < 1:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                follow.cancel()

    assert view.status == "online"
    assert view.events_seen == 3 and view.seq_gaps == 2 and view.last_seq == 5
    assert view.lowest_available == {"lot1": 1}
    frame = view.frame()
    assert "[" + "#" * 12 + "r" * 6 + "." * 6 + "]" in frame
    assert "zone A" in frame and "type ev" in frame
    assert "#2      entry.denied         gate=in1 reason=full" in frame
    assert "device=x9" in frame and "reservation_id" not in frame
    assert "2 missing by seq" in frame
    view.draw()
    line = out.getvalue()
    assert "lot1: 1/4 available" in line and "events=3" in line and "\x1b" not in line
    tty_out = io.StringIO()
    LiveView(root, tty_out, tty=True).draw()
    assert tty_out.getvalue().startswith(CLEAR_HOME)


def test_view_keeps_the_lowest_availability_and_ignores_other_roots() -> None:
    view = LiveView("parking/demo", io.StringIO(), tty=False)
    view.handle("parking/other/events", json.dumps({"seq": 1, "type": "x"}).encode())
    for available in (2, 0, 1):
        view.handle("parking/demo/lots/lot1/availability", json.dumps({"total": 2, "available": available}).encode())
    assert view.events_seen == 0
    assert view.lowest_available == {"lot1": 0}
    assert view.availability["lot1"]["available"] == 1


def test_view_counts_reservations_and_revenue() -> None:
    view = LiveView("parking/demo", io.StringIO(), tty=False)
    events = [
        {"seq": 1, "type": "reservation.created", "reservation_id": "r1", "slot": "L1-001"},
        {"seq": 2, "type": "reservation.no_show", "reservation_id": "r1", "slot": "L1-001"},
        {"seq": 3, "type": "payment.confirmed", "session_id": "s1", "amount": 300, "currency": "EUR"},
        {"seq": 4, "type": "session.ended", "session_id": "s1", "fee": {"amount": 300, "currency": "EUR"}},
        {"seq": 5, "type": "session.ended", "session_id": "s2", "fee": {"amount": 250, "currency": "EUR"}},
        {"seq": 6, "type": "payment.requested", "session_id": "s2", "amount": 250, "currency": "EUR"},
        {"seq": 7, "type": "session.ended", "session_id": "s3", "fee": {"amount": True, "currency": "EUR"}},
    ]
    for e in events:
        view.handle("parking/demo/events", json.dumps(e).encode())
    assert view.revenue_line() == ("revenue so far: 5.50 EUR (paid at pay stations 3.00 EUR, billed at exit 2.50 EUR)")
    assert view.reservations_line() == "reservations: 1 created, 0 arrived, 0 moved, 1 no-show, 0 cancelled"
    assert "revenue so far: 5.50 EUR" in view.frame() and "1 no-show" in view.frame()


def barrier_site(tmp_path: Path, port: int, barriers: Path) -> Path:
    """A gateway config on the external broker whose two gates name the ptys of `simulate --barriers`."""
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "{tmp_path / "state"}"\n'
        f"[broker]\nembedded = false\nport = {port}\n"
        '[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{ ids = "A-001..A-010" }]\n'
        '[[gates]]\nid = "in1"\nlot = "lot1"\ndirection = "entry"\ncamera = "cam-in1"\n'
        f'serial = {{ port = "{barriers / "in1"}" }}\n'
        '[[gates]]\nid = "out1"\nlot = "lot1"\ndirection = "exit"\ncamera = "cam-out1"\n'
        f'serial = {{ port = "{barriers / "out1"}" }}\n'
        '[[tariffs]]\nlot = "lot1"\ncurrency = "EUR"\nper_hour = 250\n'
    )
    return path


async def test_simulate_with_barriers_drives_cars_through_a_separate_gateway(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    barriers = tmp_path / "barriers"
    config = barrier_site(tmp_path, mosquitto.port, barriers)
    log = (tmp_path / "gateway.log").open("wb")
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(config), stdout=log, stderr=log
    )
    try:
        async with observer(mosquitto.port) as obs:
            await obs.wait_for(lambda: obs.state(f"{R}/status") == "online", timeout=30)
            sim = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "simulate", "--port", str(mosquitto.port), "--config", str(config),
                "--barriers", str(barriers), "--scenario", "traffic", "--arrivals-per-min", "30",
                "--dwell", "1", "2", "--park-delay", "0.5", "1", "--duration", "12",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(sim.communicate(), 60)
            assert sim.returncode == 0, err.decode()
            confirmed = obs.events("session.confirmed")
            opened = {e["gate"] for e in obs.events("gate.opened")}
    finally:
        if gateway.returncode is None:
            gateway.terminate()
        await asyncio.wait_for(gateway.wait(), 30)
        log.close()
    stats = json.loads(out.decode().strip().splitlines()[-1])
    assert f"barrier in1: {barriers / 'in1'}" in err.decode()
    # A car entered through the barrier: the gateway opened it and confirmed the session on the controller's
    # PASSED (a camera read alone never confirms an entry at a barrier gate).
    assert stats["entered"] > 0 and stats["entry_passed"] > 0 and stats["backed_out"] == 0, stats
    assert confirmed and all(e["gate"] == "in1" for e in confirmed)
    assert "in1" in opened and ("out1" in opened or not stats["exit_passed"])
    # `exit_unpaid = "deny"` (the default): the exit's sign asked for the fee, the driver paid, was read again.
    assert stats["pay_at_exit"] >= stats["exit_passed"] and stats["paid"] >= stats["exit_passed"], stats
    assert not any(barriers.iterdir())  # the ptys went with the simulator
    audit = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "audit", "--config", str(config), stdout=subprocess.PIPE
    )
    report, _ = await asyncio.wait_for(audit.communicate(), 60)
    assert audit.returncode == 0, report.decode()


def test_view_shows_each_gate_and_counts_its_openings_and_closings() -> None:
    view = LiveView("parking/demo", io.StringIO(), tty=False)
    # Up 3 times (once a closing reversed by a car), down twice; from offline to closed is no closing.
    moves = "offline closed opening open closed open closing opening open closing closed".split()
    for barrier in moves:
        doc = {"gate": "in1", "barrier": barrier, "mode": "normal", "vehicle_present": barrier == "opening"}
        view.handle("parking/demo/gates/in1", json.dumps(doc).encode())
    # out1 opens on the OPEN the gateway sent before its first STATUS; its controller goes away and comes back open.
    for n, barrier in enumerate("offline opening open offline open".split()):
        doc = {"gate": "out1", "barrier": barrier, "ts": f"2026-12-01T10:00:0{n}.000Z"}
        view.handle("parking/demo/gates/out1", json.dumps(doc).encode())
    stale = {"gate": "out1", "barrier": "closed", "ts": "2026-12-01T09:59:59.000Z"}
    view.handle("parking/demo/gates/out1", json.dumps(stale).encode())  # a retained copy, late: ignored
    view.handle("parking/demo/gates/in1/open", b"{}")  # Home Assistant's command topic: not a state
    for event in (
        {"seq": 1, "type": "gate.opened", "gate": "in1", "reason": "entry"},
        {"seq": 2, "type": "gate.opened", "gate": "in1", "reason": "manual", "actor": "attendant"},
        {"seq": 3, "type": "gate.opened", "gate": "out1", "reason": "exit"},
    ):
        view.handle("parking/demo/events", json.dumps(event).encode())
    assert view.gate_lines() == [
        "gate in1: opened 3 times, closed 2 times (2 OPENs, 1 by hand); now closed, mode normal, no vehicle",
        "gate out1: opened once, closed 0 times (1 OPENs, 0 by hand); now open, mode unknown, no vehicle",
    ]
    assert "gates in1 closed 3/2, out1 open 1/0 (opened/closed)" in view.summary_line()
    frame = view.frame()
    assert "gates:" in frame and "in1      closed   normal        -        up 3    down 2    OPENs 2" in frame
