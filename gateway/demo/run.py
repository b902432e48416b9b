"""`parking-gateway demo`: the bundled demo site with its gateway, embedded broker and simulated devices.

One process, one event loop: a simulated GCP/1 barrier controller per gate on a pty pair (under the state
directory; the config it runs with points each gate's serial port there), the gateway (which starts the embedded
broker), a live view fed by the gateway's MQTT topics, and, once the gateway reports `online`, a sensor fleet,
plate cameras and a traffic scenario against that broker that drives each car through its gate's barrier.
Stops on SIGINT/SIGTERM or after `duration` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiomqtt

from gateway.app import Gateway
from gateway.config import GatewayConfig, bundled_demo_path, load_config
from gateway.config.gates import SerialConfig
from gateway.demo.view import LiveView
from gateway.mqtt.broker import BrokerStartError
from simulators import make_client
from simulators.barrier import STREET_TIMINGS, BarrierFleet, BarrierSim
from simulators.cameras import PlateCamera
from simulators.cli import Site, load_site, site_traffic
from simulators.sensors import SensorFleet, SimSensor
from simulators.traffic import TrafficScenario

__all__ = ["DemoOptions", "choose_port", "run_demo"]

ONLINE_TIMEOUT_S = 30.0
CONNECT_RETRY_S = 0.2
# Fast enough that the lot visibly fills within ~20 s; each wire misbehaviour shows up a few times a minute.
ARRIVALS_PER_MIN = 120.0
DWELL_S = (5.0, 25.0)
WRONG_SLOT_SHARE = 0.1
SENSOR_DUPLICATE_RATE = 0.05
SENSOR_FLAP_RATE = 0.1
CAMERA_MISREAD_RATE = 0.05
RESERVATION_SHARE = 0.25
NO_SHOW_SHARE = 0.3
RESERVE_LEAD_S = (5.0, 12.0)
PAY_SHARE = 0.5


@dataclass(frozen=True)
class DemoOptions:
    """`duration` None: until interrupted. `port` None: the config's port if free, else a free one.
    `state_dir` None: a fresh temporary directory, removed afterwards."""

    duration: float | None = None
    port: int | None = None
    seed: int = 1
    state_dir: Path | None = None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # asyncio's servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free, as it is for them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def choose_port(host: str, configured: int, requested: int | None) -> tuple[int, str]:
    """The broker port and why: `--port`, else the configured one when free, else a free one."""
    if requested is not None:
        # Checked here, not left to the broker: the view would otherwise talk to whatever holds the port.
        if not _port_free(host, requested):
            raise BrokerStartError(f"broker: port {requested} on {host} is already in use")
        return requested, "--port"
    if _port_free(host, configured):
        return configured, "the demo config's port"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    return port, f"{configured} is in use, so a free port"


def barrier_dir(state_dir: Path) -> Path:
    """Where the demo's barrier controllers have their ptys: `<dir>/<gate id>`."""
    return state_dir / "barriers"


def demo_config(base: GatewayConfig, port: int, state_dir: Path) -> GatewayConfig:
    # The simulated pay station and booking clients are anonymous, like the devices: on the demo's loopback
    # broker they may also request (the default rule lets anonymous clients only publish device input).
    acl = state_dir / "demo.acl"
    state_dir.mkdir(parents=True, exist_ok=True)
    acl.write_text("topic readwrite #\n")
    broker = base.broker.model_copy(update={"port": port, "acl_file": str(acl)})
    gateway = base.gateway.model_copy(update={"state_dir": str(state_dir)})
    # Every gate talks GCP/1 to its simulated controller (the bundled config has no serial ports, so that
    # `run` without a config does not wait for barriers that are not there).
    gates = []
    for gate in base.gates:
        tty = {"port": str(barrier_dir(state_dir) / gate.id)}
        serial = gate.serial.model_copy(update=tty) if gate.serial else SerialConfig.model_validate(tty)
        gates.append(gate.model_copy(update={"serial": serial}))
    return base.model_copy(update={"broker": broker, "gateway": gateway, "gates": gates})


async def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when it ran and stopped cleanly, 1 when the gateway never came online."""
    config_path = bundled_demo_path()
    base = load_config(config_path)
    site = load_site(config_path)
    port, why = choose_port(base.broker.host, base.broker.port, options.port)
    temporary = options.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="parking-demo-")) if options.state_dir is None else options.state_dir
    # $STATE_DIRECTORY would win over state_dir (contract §2); the demo's store is its own.
    os.environ.pop("STATE_DIRECTORY", None)
    try:
        store = f"{state_dir} (temporary)" if temporary else str(state_dir)
        demo = _Demo(demo_config(base, port, state_dir), site, options, out, f"{port} ({why})", store)
        return await demo.run()
    finally:
        if temporary:
            shutil.rmtree(state_dir, ignore_errors=True)


class _Demo:
    def __init__(
        self, config: GatewayConfig, site: Site, options: DemoOptions, out: TextIO, port_note: str, store: str
    ) -> None:
        self.config = config
        self.site = site
        self.options = options
        self.out = out
        self.host = config.broker.host
        self.port = config.broker.port
        self.port_note = port_note
        self.root = f"{config.gateway.topic_root}/{config.gateway.id}"
        self.rng = random.Random(options.seed)
        self.fleet: SensorFleet | None = None
        self.cameras: dict[str, PlateCamera] = {}
        self.barriers = BarrierFleet(
            barrier_dir(Path(config.gateway.state_dir)),
            names=[g.id for g in config.gates if g.serial is not None],
            addresses={g.id: g.serial.address for g in config.gates if g.serial is not None},
            timings=STREET_TIMINGS,
        )
        self.controllers: list[BarrierSim] = []  # kept past the fleet's close, for the summary's counts
        self.scenario: TrafficScenario | None = None
        self.failure: str | None = None
        self.went_online = False
        self.view = LiveView(
            self.root,
            out,
            counters=self._counters,
            header=f"broker {self.host}:{port_note}, store {store}",
        )

    def _counters(self) -> dict[str, int]:
        return {
            "sensor msgs": self.fleet.published if self.fleet else 0,
            "camera reads": sum(c.reads for c in self.cameras.values()),
            # Frames the gateway sent the barrier controllers (commands and ACKs of their events).
            "serial frames": sum(len(sim.received) for sim in self.controllers),
        }

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt)
        started = time.monotonic()
        try:
            # The controllers are plugged in before the gateway opens their ports, and unplugged after it closed them.
            await self.barriers.start()
            self.controllers = list(self.barriers.sims)
            gw = Gateway(self.config)
            async with asyncio.TaskGroup() as tg:
                gateway = tg.create_task(gw.run(), name="gateway")
                gateway.add_done_callback(lambda _: stop.set())
                field = tg.create_task(self._field(stop), name="field")
                display = tg.create_task(self.view.display(), name="view")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.options.duration):
                        await stop.wait()
                # Devices and view leave the broker before the gateway takes it down.
                field.cancel()
                display.cancel()
                await asyncio.wait([field, display])
                if gateway.done():
                    self.failure = "the gateway stopped by itself"
                gw.stop()
        finally:
            await self.barriers.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        if self.failure is None and not self.went_online and not interrupted:
            self.failure = "the gateway never reported online"
        self._summary(time.monotonic() - started)
        if self.failure is not None:
            print(f"error: {self.failure}", file=sys.stderr)
            return 1
        return 0

    async def _connect(self, stack: contextlib.AsyncExitStack, identifier: str) -> aiomqtt.Client:
        """A connected client; retries while the gateway is still starting its broker."""
        while True:
            client = make_client(self.host, self.port, identifier)
            attempt = asyncio.ensure_future(client.__aenter__())
            try:
                await asyncio.shield(attempt)
            except aiomqtt.MqttError:
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            except asyncio.CancelledError:
                # paho connects in an executor thread that cancellation cannot stop; let the attempt end
                # and close it, or its socket outlives the loop and paho complains at interpreter exit.
                with contextlib.suppress(aiomqtt.MqttError):
                    await attempt
                    await client.__aexit__(None, None, None)
                raise
            stack.push_async_exit(client)
            return client

    async def _field(self, stop: asyncio.Event) -> None:
        """Watch the gateway; once it is online, run the simulated devices and traffic until cancelled."""
        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            try:
                async with asyncio.timeout(ONLINE_TIMEOUT_S):
                    view_client = await self._connect(stack, "parking-demo-view")
                    tg.create_task(self.view.follow(view_client))
                    await self.view.online.wait()
                    self.went_online = True
                    # Cars come once every barrier controller talks to the gateway (its port opens with a backoff).
                    await self.view.gates_online(self.barriers.by_name)
            except TimeoutError:
                what = "its barrier controllers online" if self.went_online else "online"
                self.failure = f"the gateway did not report {what} within {ONLINE_TIMEOUT_S:.0f} s"
                stop.set()
                return
            sim_client = await self._connect(stack, "parking-demo-sim")
            scenario = self._scenario(sim_client)
            await scenario.fleet.heartbeat_all()
            await scenario.run(None)

    def _scenario(self, client: aiomqtt.Client) -> TrafficScenario:
        site, rng = self.site, self.rng
        sensors = [
            # Alternate the wire formats so that both sensor drivers see traffic.
            SimSensor(sensor_id, "tts" if i % 2 else "json")
            for i, sensor_id in enumerate(dict.fromkeys(site.sensor_by_slot.values()))
        ]
        self.fleet = SensorFleet(
            client,
            sensors,
            rng=random.Random(rng.getrandbits(64)),
            duplicate_rate=SENSOR_DUPLICATE_RATE,
            flap_rate=SENSOR_FLAP_RATE,
        )
        self.scenario = site_traffic(
            client,
            site,
            self.fleet,
            rng,
            camera_format="mixed",
            misread_rate=CAMERA_MISREAD_RATE,
            arrivals_per_min=ARRIVALS_PER_MIN,
            dwell_s=DWELL_S,
            wrong_slot_share=WRONG_SLOT_SHARE,
            topic_root=self.config.gateway.topic_root,
            gateway_id=self.config.gateway.id,
            seed=rng.getrandbits(32),
            reservation_share=RESERVATION_SHARE,
            no_show_share=NO_SHOW_SHARE,
            reserve_lead_s=RESERVE_LEAD_S,
            pay_share=PAY_SHARE,
            barriers=self.barriers.by_name,
            barrier_check=True,
        )
        self.cameras = self.scenario.cameras
        return self.scenario

    def _summary(self, ran_s: float) -> None:
        view = self.view
        stats = self.scenario.stats if self.scenario else {}
        by_type = ", ".join(f"{t} {n}" for t, n in sorted(view.events_by_type.items()))
        lines = [
            "",
            f"demo summary: ran {ran_s:.1f} s, broker {self.host}:{self.port_note}, "
            f"gateway {view.status or 'never seen'}",
            f"  cars: {stats.get('arrivals', 0)} arrived, {stats.get('entered', 0)} entered, "
            f"{stats.get('left', 0)} left, {stats.get('denied', 0)} denied, "
            f"{stats.get('no_decision', 0) + stats.get('exit_no_decision', 0)} without a decision",
            f"  reservations: {stats.get('reserved', 0)} booked ({stats.get('no_show', 0)} no-shows), "
            f"{stats.get('reserve_refused', 0)} refused; pay station: {stats.get('paid', 0)} paid",
            f"  barriers: {stats.get('entry_passed', 0)} cars in and {stats.get('exit_passed', 0)} out through them, "
            f"{stats.get('backed_out', 0)} backed out, {stats.get('attendant_opens', 0)} opened by the attendant",
            *("  " + line for line in view.gate_lines()),
            "  " + view.revenue_line(),
            f"  events seen: {view.events_seen}" + (f" ({by_type})" if by_type else ""),
            f"  device messages: {sum(self._counters().values())} "
            f"({', '.join(f'{n} {k}' for k, n in self._counters().items())})",
            *("  " + line for line in view.availability_lines()),
        ]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
