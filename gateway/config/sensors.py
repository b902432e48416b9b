"""`[sensors]`: sensor health thresholds that are not durations."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import StrictModel


class SensorsConfig(StrictModel):
    """Sensor health (an extension of contract v1.2; see docs/design-notes.md)."""

    battery_low: float = Field(
        3.3,
        gt=0,
        description="A reported `battery` (volts) below this raises `alert` `sensor.battery_low`, at most once a day"
        " per sensor, again after it recovered (a reading of at least this + 0.1 V). 3.3 V suits the 3.6 V"
        " lithium-thionyl-chloride cells of most parking sensors: their voltage stays near 3.6 V for most of their"
        " life and falls below 3.3 V only when little capacity is left.",
    )
