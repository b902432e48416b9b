"""`parking-gateway simulate`: sensors and cameras against a broker, for bench and field tests.

Works without a gateway config; with `--config` it reads slots, sensors and gates from the TOML itself
(simulators share nothing with the gateway's code). `--barriers DIR` adds a simulated GCP/1 barrier controller
per gate on a pty at `DIR/<gate id>`, which the gateway's `[gates.serial] port` names; the traffic scenario then
drives every car through its barrier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from simulators import make_client
from simulators.barrier import STREET_TIMINGS, BarrierFleet, BarrierSim
from simulators.cameras import CameraFormat, PlateCamera
from simulators.sensors import SensorFleet, SimSensor
from simulators.traffic import TrafficOptions, TrafficScenario, rush_hours

_RANGE_END = re.compile(r"^(.*?)(\d+)$")
_HEX_EUI = re.compile(r"^[0-9a-fA-F]{16}$")


class SiteError(Exception):
    """The `--config` file cannot describe a site to simulate."""


@dataclass
class Site:
    """What the simulators need to know of a site."""

    lot: str
    sensor_by_slot: dict[str, str]
    entry_cameras: list[str] = field(default_factory=list)
    exit_cameras: list[str] = field(default_factory=list)
    gate_by_camera: dict[str, str] = field(default_factory=dict)
    # Gates with a barrier controller, by id: (the serial port the config names, or None; its address).
    serial_gates: dict[str, tuple[str | None, int]] = field(default_factory=dict)
    gateway_id: str | None = None
    topic_root: str | None = None


def expand_ids(spec: object) -> list[str]:
    """Slot ids of a group: `"P-001..P-100"` (inclusive, padding kept), one id, or a list of ids."""
    if isinstance(spec, list) and all(isinstance(s, str) for s in spec):
        return list(spec)
    if not isinstance(spec, str):
        raise SiteError(f"slot ids must be a string or a list of strings, not {spec!r}")
    if ".." not in spec:
        return [spec]
    first, _, last = spec.partition("..")
    a, b = _RANGE_END.match(first), _RANGE_END.match(last)
    if a is None or b is None or a[1] != b[1] or int(a[2]) > int(b[2]):
        raise SiteError(f"bad slot range {spec!r}")
    width = len(a[2]) if a[2].startswith("0") or len(a[2]) == len(b[2]) else 0
    return [f"{a[1]}{n:0{width}d}" for n in range(int(a[2]), int(b[2]) + 1)]


def load_site(path: Path, lot: str | None = None) -> Site:
    """Slots (with their sensors) and camera gates of one lot of a gateway TOML config."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SiteError(f"{path}: {e}") from e
    lots: list[dict[str, Any]] = doc.get("lots", [])
    if not lots:
        raise SiteError(f"{path}: no [[lots]]")
    chosen = next((x for x in lots if x.get("id") == lot), None) if lot else lots[0]
    if chosen is None:
        raise SiteError(f"{path}: no lot {lot!r}")
    site = Site(lot=str(chosen["id"]), sensor_by_slot={})
    for zone in chosen.get("zones", []):
        for group in zone.get("slots", []):
            ids = expand_ids(group.get("ids"))
            sensor = group.get("sensor")
            for slot in ids:
                site.sensor_by_slot[slot] = str(sensor) if sensor and len(ids) == 1 else slot
    for gate in doc.get("gates", []):
        if gate.get("lot", site.lot) != site.lot:
            continue
        serial = gate.get("serial")
        if isinstance(serial, dict):
            site.serial_gates[str(gate["id"])] = (str(serial.get("port")), int(serial.get("address", 1)))
        camera = gate.get("camera")
        if not camera:
            continue
        site.gate_by_camera[camera] = str(gate["id"])
        (site.entry_cameras if gate.get("direction") == "entry" else site.exit_cameras).append(camera)
    gw = doc.get("gateway", {})
    site.gateway_id = gw.get("id")
    site.topic_root = gw.get("topic_root")
    return site


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `parking-gateway simulate`."""
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    a("--port", type=int, default=1883, help="broker port (default 1883)")
    a("--username")
    a("--password")
    a("--client-id", help="MQTT client id (default parking-sim-<pid>)")
    a("--config", type=Path, help="a gateway TOML: slots, sensors and camera gates come from it")
    a("--lot", help="with --config: the lot to simulate (default the first)")
    a("--scenario", choices=("sensors", "traffic"), default="sensors")
    a("--sensors", type=int, default=20, help="without --config: number of sensors (default 20)")
    a("--sensor-prefix", default="S-", help="without --config: sensor/slot ids <prefix>001.. (default S-)")
    a("--format", choices=("json", "tts", "mixed"), default="json", help="sensor wire format")
    a("--tts-app", default="parking@ttn", help="TTS application id@tenant in the uplink topic")
    a("--cameras", type=int, default=1, help="without --config: entry and exit cameras cam-in<n>/cam-out<n>")
    a("--camera-format", choices=("json", "platerecognizer", "mixed"), default="json")
    a("--rate", type=float, default=10.0, help="sensors scenario: transitions per second (default 10)")
    a("--arrivals-per-min", type=float, default=20.0, help="traffic scenario: mean arrivals (default 20)")
    a("--dwell", type=float, nargs=2, default=(5.0, 40.0), metavar=("MIN", "MAX"), help="seconds parked")
    a("--park-delay", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"), help="gate to slot")
    a("--rush-hours", action="store_true", help="traffic scenario: scale arrivals by time of day")
    a("--heartbeat", type=float, help="every sensor reports its state again every S seconds")
    a(
        "--barriers",
        type=Path,
        metavar="DIR",
        help="a simulated barrier controller per gate (with --config: per gate with [gates.serial]) on a pty at "
        "DIR/<gate id>, where the gateway's serial port points; traffic then goes through the barriers",
    )
    a("--duration", type=float, help="stop after S seconds (default: until interrupted)")
    a("--topic-root", help="the gateway's topic root (default from --config, else parking)")
    a("--gateway-id", help="the gateway id (default from --config, else demo)")
    a("--seed", type=int, default=1)
    a("--duplicate-rate", type=float, default=0.0)
    a("--reorder-rate", type=float, default=0.0)
    a("--flap-rate", type=float, default=0.0)
    a("--misread-rate", type=float, default=0.0)
    a("--reserve-share", type=float, default=0.0, help="traffic scenario: share of cars that reserve ahead")
    a("--no-show-share", type=float, default=0.0, help="traffic scenario: share of reservations nobody comes for")
    a("--pay-share", type=float, default=0.0, help="traffic scenario: share of cars that quote and pay first")


def _site(args: argparse.Namespace) -> Site:
    if args.config is not None:
        return load_site(args.config, args.lot)
    slots = {f"{args.sensor_prefix}{i:03d}": f"{args.sensor_prefix}{i:03d}" for i in range(1, args.sensors + 1)}
    site = Site(lot=args.lot or "lot1", sensor_by_slot=slots)
    for n in range(1, args.cameras + 1):
        for kind, cameras in (("in", site.entry_cameras), ("out", site.exit_cameras)):
            site.gate_by_camera[f"cam-{kind}{n}"] = f"{kind}{n}"
            site.serial_gates[f"{kind}{n}"] = (None, 1)
            cameras.append(f"cam-{kind}{n}")
    return site


def barrier_fleet(directory: Path, site: Site) -> BarrierFleet:
    """One controller per barrier gate of the site at `directory/<gate id>`; says on stderr where (and where the
    config's port names another path, which the gateway would then never find)."""
    fleet = BarrierFleet(
        directory,
        names=list(site.serial_gates),
        addresses={gate: address for gate, (_, address) in site.serial_gates.items()},
        timings=STREET_TIMINGS,
    )
    for gate, (port, address) in site.serial_gates.items():
        path = directory / gate
        note = f"barrier {gate}: {path} (address {address})"
        if port is not None and Path(port).absolute() != path.absolute():
            note += f"; warning: the config's port is {port}"
        print(f"parking-gateway simulate: {note}", file=sys.stderr)
    return fleet


def _sensor_format(fmt: str, sensor_id: str, index: int) -> str:
    if fmt != "mixed":
        return fmt
    # LoRaWAN devices are named by their DevEUI; the rest alternate so both drivers get traffic.
    return "tts" if _HEX_EUI.match(sensor_id) or index % 2 else "json"


async def _simulate(args: argparse.Namespace, site: Site, client: aiomqtt.Client) -> dict[str, int]:
    if args.barriers is None:
        return await _simulate_with(args, site, client, {})
    async with barrier_fleet(args.barriers, site) as fleet:
        return await _simulate_with(args, site, client, fleet.by_name)


async def _simulate_with(
    args: argparse.Namespace, site: Site, client: aiomqtt.Client, barriers: dict[str, BarrierSim]
) -> dict[str, int]:
    rng = random.Random(args.seed)
    sensors = [
        SimSensor(s, "tts" if _sensor_format(args.format, s, i) == "tts" else "json")
        for i, s in enumerate(dict.fromkeys(site.sensor_by_slot.values()))
    ]
    fleet = SensorFleet(
        client,
        sensors,
        tts_app=args.tts_app,
        rng=random.Random(rng.getrandbits(64)),
        duplicate_rate=args.duplicate_rate,
        reorder_rate=args.reorder_rate,
        flap_rate=args.flap_rate,
    )
    await fleet.heartbeat_all()
    async with asyncio.TaskGroup() as tg:
        beats = tg.create_task(fleet.run_heartbeats(args.heartbeat)) if args.heartbeat else None
        if args.scenario == "sensors":
            await fleet.run_load(args.rate, args.duration)
            stats = {"published": fleet.published}
        else:
            scenario = _traffic(args, site, client, fleet, rng, barriers)
            await scenario.run(args.duration)
            stats = scenario.stats | {"published_sensor_messages": fleet.published}
        if beats is not None:
            beats.cancel()
    return stats


def site_traffic(
    client: aiomqtt.Client,
    site: Site,
    fleet: SensorFleet,
    rng: random.Random,
    *,
    camera_format: str = "mixed",
    misread_rate: float = 0.0,
    barriers: dict[str, BarrierSim] | None = None,
    **options: Any,
) -> TrafficScenario:
    """A traffic scenario over a site's cameras (and barrier controllers, by gate id); `options` are
    TrafficOptions fields beyond the site's own."""
    cameras: dict[str, PlateCamera] = {}
    for i, cam in enumerate((*site.entry_cameras, *site.exit_cameras)):
        fmt: CameraFormat = "json"
        if camera_format == "platerecognizer" or (camera_format == "mixed" and i % 2):
            fmt = "platerecognizer"
        cameras[cam] = PlateCamera(
            client, cam, fmt=fmt, rng=random.Random(rng.getrandbits(64)), misread_rate=misread_rate
        )
    traffic = TrafficOptions(
        lot=site.lot,
        entry_cameras=site.entry_cameras,
        exit_cameras=site.exit_cameras,
        sensor_ids_by_slot=site.sensor_by_slot,
        gate_by_camera=site.gate_by_camera,
        **options,
    )
    return TrafficScenario(client, fleet, cameras, traffic, barriers)


def _traffic(
    args: argparse.Namespace,
    site: Site,
    client: aiomqtt.Client,
    fleet: SensorFleet,
    rng: random.Random,
    barriers: dict[str, BarrierSim],
) -> TrafficScenario:
    return site_traffic(
        client,
        site,
        fleet,
        rng,
        barriers=barriers,
        camera_format=args.camera_format,
        misread_rate=args.misread_rate,
        arrivals_per_min=args.arrivals_per_min,
        dwell_s=(float(args.dwell[0]), float(args.dwell[1])),
        park_delay_s=(float(args.park_delay[0]), float(args.park_delay[1])),
        topic_root=args.topic_root or site.topic_root or "parking",
        gateway_id=args.gateway_id or site.gateway_id or "demo",
        seed=args.seed,
        rate_curve=rush_hours if args.rush_hours else None,
        reservation_share=args.reserve_share,
        no_show_share=args.no_show_share,
        pay_share=args.pay_share,
    )


async def run_from_args(args: argparse.Namespace) -> int:
    """Run the chosen scenario; prints its counts as one JSON line. 0 ok, 1 broker failure, 2 usage."""
    try:
        site = _site(args)
        if args.scenario == "traffic" and (not site.entry_cameras or not site.exit_cameras):
            raise SiteError("the traffic scenario needs at least one entry and one exit camera")
        if not site.sensor_by_slot:
            raise SiteError("no sensors to simulate")
        if args.barriers is not None and not site.serial_gates:
            raise SiteError(f"--barriers: no gate of lot {site.lot} has a [gates.serial] table")
    except SiteError as e:
        print(f"parking-gateway simulate: {e}", file=sys.stderr)
        return 2
    client = make_client(
        args.host,
        args.port,
        args.client_id or f"parking-sim-{os.getpid()}",
        username=args.username,
        password=args.password,
    )
    try:
        async with client:
            stats = await _simulate(args, site, client)
    except (aiomqtt.MqttError, ExceptionGroup) as e:
        error = _mqtt_error(e)
        if error is None:
            raise
        print(f"parking-gateway simulate: broker {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(stats, sort_keys=True))
    return 0


def _mqtt_error(e: BaseException) -> aiomqtt.MqttError | None:
    """The broker failure behind `e`, also from inside task groups."""
    if isinstance(e, aiomqtt.MqttError):
        return e
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            found = _mqtt_error(inner)
            if found is not None:
                return found
    return None
