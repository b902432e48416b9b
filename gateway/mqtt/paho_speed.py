"""paho's MQTT 5 `Properties`, made cheap to create and to clear (paho-mqtt 2.x, pinned in pyproject).

paho builds a `Properties` for every MQTT 5 PUBLISH it receives and every PUBACK of our own publishes; its
constructor rebuilds three lookup tables each time and `clear()` (called by every `unpack`) walks all 27
property names. In a profile of the daemon under a sensor burst (bench/ingest.py --profile) that was the
largest single cost of MQTT 5 over 3.1.1. The tables are constants, only ever read, so every instance can share
one copy; `clear()` removes the instance's property attributes directly. Behaviour is unchanged
(tests/test_paho_speed.py compares against paho's own code).
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["install"]

_ORIGINAL_INIT = Properties.__init__
_ORIGINAL_CLEAR = Properties.clear
# Set by Properties.__init__ itself; everything else in an instance's __dict__ is a property value.
_PRIVATE = frozenset(("packetType", "types", "names", "properties"))
_TABLES: tuple[Any, Any, Any] | None = None


def _init(self: Properties, packetType: int) -> None:
    assert _TABLES is not None
    d = self.__dict__
    d["packetType"] = packetType
    d["types"], d["names"], d["properties"] = _TABLES


def _clear(self: Properties) -> None:
    for name in [n for n in self.__dict__ if n not in _PRIVATE]:
        delattr(self, name)


def install() -> None:
    """Idempotent; affects every paho client of the process (the gateway's only)."""
    global _TABLES
    if Properties.__init__ is _init:
        return
    template = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    _TABLES = (template.types, template.names, template.properties)
    Properties.__init__ = _init  # type: ignore[method-assign]
    Properties.clear = _clear  # type: ignore[method-assign]


def uninstall() -> None:
    """Back to paho's own code (for the comparison test)."""
    Properties.__init__ = _ORIGINAL_INIT  # type: ignore[method-assign]
    Properties.clear = _ORIGINAL_CLEAR  # type: ignore[method-assign]
