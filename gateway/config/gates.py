"""`[[gates]]`: lanes and their barrier controllers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.config.base import DEVICE_ID, ID_CHARS, StrictModel

STANDARD_BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


class SerialConfig(StrictModel):
    """The barrier controller's serial line (GCP/1)."""

    port: str = Field(min_length=1, description="Serial device, e.g. `/dev/ttyUSB0`.")
    baudrate: int = Field(9600, description=f"One of {', '.join(map(str, STANDARD_BAUDRATES))}; 8N1.")
    address: int = Field(1, ge=0, le=255, description="Controller address on the line, 0..255.")

    @field_validator("baudrate")
    @classmethod
    def _standard_rate(cls, value: int) -> int:
        if value not in STANDARD_BAUDRATES:
            raise ValueError(f"not a standard rate ({', '.join(map(str, STANDARD_BAUDRATES))}): {value}")
        return value


class GateConfig(StrictModel):
    """An entry or exit lane: a barrier controller and an optional plate camera."""

    id: str = Field(pattern=rf"^{ID_CHARS}$", description="Gate id; appears in topics.")
    lot: str = Field(description="The lot this gate serves.")
    direction: Literal["entry", "exit"] = Field(description="`entry` or `exit`.")
    camera: str | None = Field(None, pattern=DEVICE_ID, description="Plate camera id; unset: no camera.")
    serial: SerialConfig | None = Field(None, description="Barrier controller; unset: no barrier.")
