"""gateway.mqtt.paho_speed changes how fast paho's Properties are, not what they do."""

from __future__ import annotations

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt import paho_speed


def _build(packet_type: int, **values: object) -> Properties:
    props = Properties(packet_type)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


CASES: list[tuple[int, dict[str, object]]] = [
    (PacketTypes.PUBLISH, {}),
    (PacketTypes.PUBLISH, {"ResponseTopic": "R/response/x", "CorrelationData": b"\x01\x02"}),
    (PacketTypes.PUBLISH, {"UserProperty": [("a", "1"), ("b", "2")], "MessageExpiryInterval": 60}),
    (PacketTypes.CONNECT, {"ReceiveMaximum": 64, "SessionExpiryInterval": 86400}),
    (PacketTypes.PUBACK, {"ReasonString": "ok"}),
]


def _round_trip(packet_type: int, values: dict[str, object]) -> tuple[bytes, str]:
    packed = _build(packet_type, **values).pack()  # type: ignore[no-untyped-call]
    fresh = Properties(packet_type)  # type: ignore[no-untyped-call]
    if packet_type == PacketTypes.PUBLISH:
        fresh.ResponseTopic = "stale"  # unpack() clears what was there first
    fresh.unpack(packed)  # type: ignore[no-untyped-call]
    return bytes(packed), str(fresh)


def _refusals() -> list[str]:
    out = []
    for packet_type, name, value in (
        (PacketTypes.PUBLISH, "NoSuchProperty", 1),
        (PacketTypes.PUBACK, "ResponseTopic", "x"),  # not a PUBACK property
        (PacketTypes.CONNECT, "ReceiveMaximum", 0),
    ):
        with pytest.raises(MQTTException) as exc:
            _build(packet_type, **{name: value})
        out.append(str(exc.value))
    return out


def test_pack_unpack_and_refusals_are_paho_s_own() -> None:
    paho_speed.install()
    patched = [_round_trip(t, v) for t, v in CASES], _refusals()
    paho_speed.uninstall()
    try:
        assert patched == ([_round_trip(t, v) for t, v in CASES], _refusals())
    finally:
        paho_speed.install()
