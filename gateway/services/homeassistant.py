"""Home Assistant MQTT discovery (contract §3.4 v1.2): one device per lot and per gate, retained.

A lot's device has sensors of its available and occupied counts, per zone and per type (and for the whole
lot), read from `R/lots/<lot>/availability`. A gate's device has its barrier state and vehicle presence, read
from `R/gates/<gate>`, and an open button whose command topic is `R/gates/<gate>/open`. Every entity is
available while `R/status` says `online`. The payloads are retained on the broker Home Assistant listens to,
re-published with the link's retained state after each reconnect, and again whenever `<prefix>/status` says
`online` (Home Assistant's birth message: it may have lost them).
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.mqtt.link import Incoming, MqttLink
from gateway.mqtt.topics import Topics

log = structlog.get_logger("gateway.homeassistant")

ORIGIN = {"name": "parking-gateway", "sw_version": __version__}
BARRIER_STATES = ["closed", "opening", "open", "closing", "fault", "offline"]


def discovery(config: GatewayConfig, topics: Topics, prefix: str) -> dict[str, dict[str, Any]]:
    """Discovery topic -> payload for every lot and gate of the config."""
    gw = config.gateway.id
    availability = [{"topic": topics.status, "payload_available": "online", "payload_not_available": "offline"}]
    out: dict[str, dict[str, Any]] = {}
    specs = config.slot_specs()
    for lot in config.lots:
        device_id = f"{gw}_{lot.id}"
        components: dict[str, dict[str, Any]] = {}
        groups: list[tuple[str, str, str]] = [("", "", lot.name or lot.id)]  # (json path, id part, name)
        groups += [(f".zones['{z.id}']", z.id, f"Zone {z.name or z.id}") for z in lot.zones]
        lot_types = list(dict.fromkeys(s.type for s in specs if s.lot == lot.id))
        groups += [(f".types['{t}']", t, f"Type {t}") for t in lot_types]
        for path, part, name in groups:
            for count in ("available", "occupied"):
                unique = f"{device_id}_{part}_{count}" if part else f"{device_id}_{count}"
                label = f"{name} {count}" if part else count.capitalize()
                components[unique] = {
                    "platform": "sensor",
                    "unique_id": unique,
                    "name": label,
                    "value_template": f"{{{{ value_json{path}.{count} }}}}",
                    "state_class": "measurement",
                    "unit_of_measurement": "slots",
                    "icon": "mdi:car" if count == "occupied" else "mdi:parking",
                }
        out[f"{prefix}/device/{device_id}/config"] = {
            "device": {
                "identifiers": [device_id],
                "name": lot.name or lot.id,
                "manufacturer": "parking-gateway",
                "model": "car park",
                "sw_version": __version__,
            },
            "origin": ORIGIN,
            "availability": availability,
            "state_topic": topics.availability(lot.id),
            "qos": 1,
            "components": components,
        }
    for gate in config.gates:
        device_id = f"{gw}_{gate.id}"
        state = f"{topics.root}/gates/{gate.id}"
        out[f"{prefix}/device/{device_id}/config"] = {
            "device": {
                "identifiers": [device_id],
                "name": f"Gate {gate.id}",
                "manufacturer": "parking-gateway",
                "model": f"{gate.direction} lane",
                "sw_version": __version__,
                "via_device": f"{gw}_{gate.lot}",
            },
            "origin": ORIGIN,
            "availability": availability,
            "qos": 1,
            "components": {
                f"{device_id}_barrier": {
                    "platform": "sensor",
                    "unique_id": f"{device_id}_barrier",
                    "name": "Barrier",
                    "state_topic": state,
                    "value_template": "{{ value_json.barrier }}",
                    "device_class": "enum",
                    "options": BARRIER_STATES,
                },
                f"{device_id}_vehicle": {
                    "platform": "binary_sensor",
                    "unique_id": f"{device_id}_vehicle",
                    "name": "Vehicle present",
                    "state_topic": state,
                    "value_template": "{{ 'ON' if value_json.vehicle_present else 'OFF' }}",
                    "device_class": "occupancy",
                },
                f"{device_id}_open": {
                    "platform": "button",
                    "unique_id": f"{device_id}_open",
                    "name": "Open",
                    "command_topic": f"{state}/open",
                    "payload_press": "open",
                    "retain": False,
                    "icon": "mdi:boom-gate-up",
                },
            },
        }
    return out


class HomeAssistant:
    """A service: publishes the discovery payloads on `link` (under `topics`, that broker's R)."""

    name = "homeassistant"

    def __init__(self, config: GatewayConfig, link: MqttLink, topics: Topics) -> None:
        ha = config.homeassistant
        assert ha is not None, "no [homeassistant] in the config"
        self.prefix = ha.prefix
        self.status_topic = f"{ha.prefix}/status"
        self._link = link
        self._payloads = {
            topic: json.dumps(doc, separators=(",", ":")).encode()
            for topic, doc in discovery(config, topics, ha.prefix).items()
        }
        self.births = 0

    async def start(self) -> None:
        self.publish_all()

    async def run(self) -> None:
        return

    async def stop(self) -> None:
        return

    async def health(self) -> dict[str, Any]:
        return {"devices": len(self._payloads), "births": self.births}

    def publish_all(self) -> None:
        for topic, payload in self._payloads.items():
            self._link.publish(topic, payload, qos=1, retain=True)

    async def on_status(self, msg: Incoming) -> None:
        """`<prefix>/status`: Home Assistant (re)started and may have lost the discovery payloads."""
        if msg.payload.strip() == b"online":
            self.births += 1
            log.info("homeassistant.online", devices=len(self._payloads))
            self.publish_all()
