"""`[upstream]`: the broker that receives the outbox."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from gateway.config.base import TOPIC_ROOT, Problems, StrictModel, check_secret_source
from gateway.config.tls import TLSConfig


class UpstreamConfig(StrictModel):
    """The upstream broker that receives the event outbox and may send requests; absent: no upstream sync."""

    host: str = Field(min_length=1, description="Upstream broker host name or address.")
    port: int = Field(8883, ge=1, le=65535, description="TCP port, 1..65535.")
    tls: TLSConfig | None = Field(
        None, description="TLS (CA, client certificate); unset: plain TCP, with a warning in the log."
    )
    username: str | None = Field(None, min_length=1, description="User name.")
    password: str | None = Field(None, description="Password.")
    password_file: str | None = Field(
        None, min_length=1, description="File whose first line is the password; instead of `password`."
    )
    topic_root: str | None = Field(
        None, pattern=TOPIC_ROOT, description="Topic root upstream; unset: `[gateway].topic_root`."
    )
    outbox_max_bytes: int = Field(
        268_435_456,
        ge=1_048_576,
        description="Bound of the outbox on disk while upstream is unreachable (at least 1 MiB); past it "
        "superseded state events are compacted.",
    )
    keepalive: int = Field(30, ge=1, le=65535, description="MQTT keepalive in seconds.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = check_secret_source(self.password, self.password_file)
        if problems:
            raise Problems(problems)
        return self
