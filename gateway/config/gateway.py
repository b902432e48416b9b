"""`[gateway]`: identity, state directory, topic root, time zone."""

from __future__ import annotations

import zoneinfo

from pydantic import Field, field_validator

from gateway.config.base import TOPIC_ROOT, StrictModel


class GatewaySection(StrictModel):
    """This gateway: its identity, where it keeps its store, where its own topics live, and its local time."""

    id: str = Field(pattern=r"^[a-z0-9-]{1,32}$", description="Gateway id, `[a-z0-9-]{1,32}`; part of every topic.")
    state_dir: str = Field(
        "var",
        min_length=1,
        description="Directory of the SQLite store `gateway.db` and the plate key, relative to the working "
        "directory; `$STATE_DIRECTORY` (set by systemd) wins when set; created if missing.",
    )
    topic_root: str = Field(
        "parking",
        pattern=TOPIC_ROOT,
        description="The gateway's own topics are `<topic_root>/<id>/...`; one or more levels, no wildcards.",
    )
    timezone: str = Field(
        "UTC",
        description="IANA time zone name (e.g. `Europe/Berlin`, case as in the tz database) of the local time "
        "that tariff `periods` are written in; daylight saving time is followed. Names are resolved from the "
        "system's tz database, else the bundled `tzdata` package.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value in ("localtime", "posixrules"):
            # Both exist on many systems but mean "whatever this machine says": not a name another box shares.
            raise ValueError(f"{value!r} is not an IANA zone name: name the zone, e.g. 'Europe/Berlin'")
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'Europe/Berlin')") from None
        return value
