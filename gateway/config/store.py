"""`[store]`: the SQLite store."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.config.base import StrictModel


class StoreConfig(StrictModel):
    """The SQLite store (extension of the contract)."""

    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite `synchronous`: `FULL` survives power loss; `NORMAL` (WAL) may lose the last "
        "commits on power loss, never corrupts.",
    )
    group_commit_max: int = Field(256, ge=1, le=10000, description="Most commands applied in one transaction.")
    rejections_kept: int = Field(1000, ge=0, description="How many rejected device messages the store keeps.")
