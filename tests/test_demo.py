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

DEMO_SLOTS = 120
SUMMARY = re.compile(r"cars: (\d+) arrived, (\d+) entered, (\d+) left, (\d+) denied")
LOWEST = re.compile(r"availability lot1: (\d+)/(\d+) available.*\(lowest available seen: (\d+)\)")


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


def check_summary(out: str) -> tuple[int, int]:
    """(cars entered, lowest availability seen) from the final summary."""
    assert "demo summary" in out
    cars, low = SUMMARY.search(out), LOWEST.search(out)
    assert cars is not None and low is not None, out
    assert int(low[2]) == DEMO_SLOTS
    return int(cars[2]), int(low[3])


def test_demo_runs_for_its_duration_and_stops_cleanly() -> None:
    res = subprocess.run(demo_cmd("--duration", "8"), capture_output=True, text=True, timeout=90)
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
