"""`[gateway]`: identity, state directory, topic root."""

from __future__ import annotations

from pydantic import Field

from gateway.config.base import TOPIC_ROOT, StrictModel


class GatewaySection(StrictModel):
    """This gateway: its identity, where it keeps its store, and where its own topics live."""

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
