"""`[homeassistant]`: MQTT discovery for Home Assistant (contract §3.4 v1.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.config.base import TOPIC_ROOT, StrictModel

# Home Assistant accepts these characters in discovery ids (the topic's object id and component ids).
HA_ID = r"^[A-Za-z0-9_-]+$"


class HomeAssistantConfig(StrictModel):
    """Device-based MQTT discovery of each lot and gate; absent: no discovery."""

    broker: Literal["local", "upstream"] = Field(
        "local", description="Where Home Assistant listens: the local broker or the upstream one (needs [upstream])."
    )
    prefix: str = Field("homeassistant", pattern=TOPIC_ROOT, description="Home Assistant's discovery prefix.")
