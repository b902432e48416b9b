"""`[privacy]`: plate key, what leaves the gateway, retention."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import StrictModel


class PrivacyConfig(StrictModel):
    """What leaves the gateway, and for how long plates are kept."""

    plate_key_file: str = Field(
        "plate.key",
        min_length=1,
        description="HMAC key for vehicle tokens, relative to the state directory; created (0600) on first "
        "start if missing.",
    )
    publish_plates: bool = Field(False, description="Events carry plates instead of vehicle tokens.")
    retention_days: int = Field(30, ge=1, description="Ended sessions: the plate is replaced by its token after this.")
