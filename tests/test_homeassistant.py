"""Home Assistant discovery (contract §3.4): the payloads checked against Home Assistant's documented
device-discovery schema, and the daemon publishing them retained and again on Home Assistant's birth.

The rules below are those of Home Assistant's MQTT integration for device-based discovery (its
`DEVICE_DISCOVERY_SCHEMA`, the discovery topic matcher and the platform schemas of sensor, binary_sensor and
button), written out here because Home Assistant itself is not a dependency of this project.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.app import Gateway
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.mqtt.topics import Topics
from gateway.services.homeassistant import discovery
from tests.conftest import MosquittoProcess, free_port

# Home Assistant: homeassistant/components/mqtt/discovery.py TOPIC_MATCHER (object ids)
OBJECT_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
ROOT_KEYS = {  # DEVICE_DISCOVERY_SCHEMA: the shared options
    "device", "origin", "components", "availability", "availability_mode", "availability_template",
    "availability_topic", "payload_available", "payload_not_available", "state_topic", "command_topic", "qos",
    "encoding",
}  # fmt: skip
DEVICE_KEYS = {
    "identifiers", "connections", "manufacturer", "model", "name", "hw_version", "serial_number", "sw_version",
    "via_device", "suggested_area", "configuration_url",
}  # fmt: skip
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
SENSOR_DEVICE_CLASSES_WITHOUT_UNIT = {"enum"}


def check_topic(topic: str, *, subscribe: bool) -> None:
    assert topic and "\x00" not in topic and len(topic.encode()) <= 65535
    if not subscribe:
        assert "+" not in topic and "#" not in topic
    for i, level in enumerate(levels := topic.split("/")):
        if "#" in level:
            assert level == "#" and i == len(levels) - 1
        if "+" in level:
            assert level == "+"


def check_device_discovery(topic: str, payload: dict[str, Any], prefix: str) -> list[str]:
    """Home Assistant's rules for one device discovery message; returns the unique ids it declares."""
    m = re.fullmatch(rf"{re.escape(prefix)}/device/(?P<object_id>[^/]+)/config", topic)
    assert m and OBJECT_ID.match(m["object_id"]), topic
    assert set(payload) <= ROOT_KEYS, set(payload) - ROOT_KEYS
    device = payload["device"]  # required
    assert set(device) <= DEVICE_KEYS and (device.get("identifiers") or device.get("connections"))
    assert all(isinstance(i, str) for i in device["identifiers"])
    origin = payload["origin"]  # required, with a name
    assert set(origin) <= ORIGIN_KEYS and isinstance(origin["name"], str) and origin["name"]
    assert not ("availability" in payload and "availability_topic" in payload)  # exclusive
    for entry in payload.get("availability", []):
        check_topic(entry["topic"], subscribe=True)  # required in each entry
        assert isinstance(entry.get("payload_available", "online"), str)
    assert payload.get("qos", 0) in (0, 1, 2)
    uniques = []
    for component_id, component in payload["components"].items():  # required
        assert OBJECT_ID.match(component_id)
        platform = component["platform"]  # required
        assert platform in {"sensor", "binary_sensor", "button"}
        unique = component["unique_id"]  # required for entity components
        assert isinstance(unique, str) and unique
        uniques.append(unique)
        merged = {**{k: v for k, v in payload.items() if k in ROOT_KEYS - {"device", "origin"}}, **component}
        if platform in ("sensor", "binary_sensor"):
            check_topic(merged["state_topic"], subscribe=True)
        if platform == "button":
            check_topic(merged["command_topic"], subscribe=False)
        if component.get("device_class") == "enum":
            assert component["options"] and "unit_of_measurement" not in component and "state_class" not in component
        if "value_template" in component:
            assert component["value_template"].startswith("{{") and component["value_template"].endswith("}}")
    return uniques


CONFIG = """
[gateway]
id = "gw1"
state_dir = "{state}"
[broker]
{broker}
[homeassistant]
{ha}
[[lots]]
id = "lot1"
name = "Main Street Garage"
  [[lots.zones]]
  id = "L1"
  slots = [{{ ids = "L1-001..L1-010" }}, {{ ids = "L1-011..L1-012", type = "ev" }}]
  [[lots.zones]]
  id = "L2"
  slots = [{{ ids = "L2-001..L2-005", type = "accessible" }}]
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
[[gates]]
id = "out1"
lot = "lot1"
direction = "exit"
{extra}
"""


EMBEDDED = "embedded = true\nallow_anonymous = true\nport = {port}"


def site(tmp_path: Path, *, ha: str = "", extra: str = "", broker: str = EMBEDDED.format(port=1883)) -> GatewayConfig:
    return parse_config(CONFIG.format(state=tmp_path / "state", broker=broker, ha=ha, extra=extra))


def test_discovery_payloads_follow_home_assistants_schema_with_the_contracts_unique_ids(tmp_path: Path) -> None:
    cfg = site(tmp_path)
    topics = Topics("parking/gw1")
    payloads = discovery(cfg, topics, "homeassistant")
    assert sorted(payloads) == [
        "homeassistant/device/gw1_in1/config",
        "homeassistant/device/gw1_lot1/config",
        "homeassistant/device/gw1_out1/config",
    ]
    uniques: list[str] = []
    for topic, payload in payloads.items():
        uniques += check_device_discovery(topic, json.loads(json.dumps(payload)), "homeassistant")
        assert payload["availability"] == [
            {"topic": "parking/gw1/status", "payload_available": "online", "payload_not_available": "offline"}
        ]
    assert len(uniques) == len(set(uniques))  # unique across the whole site
    lot = set(payloads["homeassistant/device/gw1_lot1/config"]["components"])
    assert {f"gw1_lot1_{part}_{count}" for part in ("L1", "L2", "standard", "ev", "accessible")
            for count in ("available", "occupied")} <= lot  # fmt: skip
    assert set(payloads["homeassistant/device/gw1_in1/config"]["components"]) == {
        "gw1_in1_barrier", "gw1_in1_vehicle", "gw1_in1_open",
    }  # fmt: skip
    gate = payloads["homeassistant/device/gw1_in1/config"]["components"]
    assert gate["gw1_in1_open"]["command_topic"] == "parking/gw1/gates/in1/open"
    assert gate["gw1_in1_barrier"]["state_topic"] == "parking/gw1/gates/in1"
    assert payloads["homeassistant/device/gw1_lot1/config"]["state_topic"] == "parking/gw1/lots/lot1/availability"
    # the same ids from the same config: stable across restarts
    assert discovery(cfg, topics, "homeassistant") == payloads


def test_value_templates_read_the_availability_document() -> None:
    """Home Assistant renders Jinja; the templates are simple attribute paths, checked on a real document."""
    doc = {"available": 7, "occupied": 3, "zones": {"L1": {"available": 5, "occupied": 2}},
           "types": {"ev": {"available": 1, "occupied": 1}}}  # fmt: skip
    for template, expected in (
        ("{{ value_json.available }}", 7),
        ("{{ value_json.zones['L1'].occupied }}", 2),
        ("{{ value_json.types['ev'].available }}", 1),
    ):
        path = template.removeprefix("{{ value_json").removesuffix(" }}")
        value: Any = doc
        for part in re.findall(r"\.(\w+)|\['([^']+)'\]", path):
            value = value[part[0] or part[1]]
        assert value == expected


@pytest.mark.parametrize(
    ("ha", "extra", "error"),
    [
        ('broker = "upstream"', "", 'homeassistant.broker: "upstream" needs an [upstream] table'),
        ("", '[[gates]]\nid = "in.2"\nlot = "lot1"\ndirection = "entry"\n', "gates[2].id: 'in.2': Home Assistant"),
        ('prefix = "ha/#"', "", "homeassistant.prefix: String should match pattern"),
    ],
)
def test_home_assistant_config_errors(tmp_path: Path, ha: str, extra: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        site(tmp_path, ha=ha, extra=extra)
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors


def test_a_zone_named_like_a_type_would_collide(tmp_path: Path) -> None:
    text = CONFIG.format(state=tmp_path, broker=EMBEDDED.format(port=1), ha="", extra="").replace(
        'id = "L2"', 'id = "ev"'
    )
    with pytest.raises(ConfigError, match="would be the same"):
        parse_config(text)


async def test_the_daemon_publishes_discovery_retained_and_again_on_home_assistants_birth(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    # An external local broker: the embedded one's default ACL lets no one but the gateway publish a birth.
    port = mosquitto.port
    cfg = site(tmp_path, broker=f"embedded = false\nport = {port}")
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.wait_ready(), 20)
        await gw.link.wait_connected(20)
        async with aiomqtt.Client("127.0.0.1", port, identifier="home-assistant") as ha:
            await ha.subscribe("homeassistant/device/+/config", qos=1)
            got: dict[str, int] = {}

            async def collect(n: int) -> None:
                async for message in ha.messages:
                    got[message.topic.value] = got.get(message.topic.value, 0) + 1
                    if sum(got.values()) >= n:
                        return

            await asyncio.wait_for(collect(3), 10)  # the retained copies, on subscribing
            assert set(got) == {f"homeassistant/device/gw1_{d}/config" for d in ("lot1", "in1", "out1")}
            await ha.publish("homeassistant/status", b"online", qos=1)  # Home Assistant (re)started
            await asyncio.wait_for(collect(6), 10)
            assert all(n == 2 for n in got.values())
    finally:
        gw.stop()
        await asyncio.wait_for(task, 20)


async def test_discovery_on_the_upstream_broker(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    extra = f"[upstream]\nhost = '127.0.0.1'\nport = {mosquitto.port}\ntopic_root = 'central'\n"
    cfg = site(tmp_path, ha='broker = "upstream"\nprefix = "ha"', extra=extra, broker=EMBEDDED.format(port=free_port()))
    gw = Gateway(cfg)
    task = asyncio.create_task(gw.run())
    try:
        await asyncio.wait_for(gw.wait_ready(), 20)
        assert gw.upstream is not None
        await gw.upstream.link.wait_connected(20)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="home-assistant") as ha:
            await ha.subscribe("ha/device/gw1_lot1/config", qos=1)
            async with asyncio.timeout(10):
                message = await anext(aiter(ha.messages))
            doc = json.loads(bytes(message.payload))
            check_device_discovery(message.topic.value, doc, "ha")
            assert doc["availability"][0]["topic"] == "central/gw1/status"
            assert doc["state_topic"] == "central/gw1/lots/lot1/availability"
            await ha.publish("ha/status", b"online", qos=1)
            async with asyncio.timeout(10):
                again = await anext(aiter(ha.messages))
            assert again.payload == message.payload and not again.retain
        assert gw.homeassistant is not None and gw.homeassistant.births == 1
    finally:
        gw.stop()
        await asyncio.wait_for(task, 20)
