"""`[upstream]`: the broker that receives the outbox."""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, model_validator

from gateway.config.base import TOPIC_ROOT, Loc, Problems, StrictModel, check_secret_source
from gateway.config.tls import TLSConfig

DEFAULT_PORT = 8883
# host:port, host alone, [v6-address]:port
_NODE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]/]+))(?::(?P<port>[0-9]{1,5}))?$")


def parse_node(text: str) -> tuple[str, int]:
    """`host:port` (port optional, 8883) -> (host, port); ValueError with the reason otherwise."""
    m = _NODE.fullmatch(text)
    if m is None:
        raise ValueError(f"not host:port: {text!r}")
    port = int(m["port"]) if m["port"] is not None else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range 1..65535: {text!r}")
    return m["v6"] or m["host"], port


class UpstreamConfig(StrictModel):
    """The upstream broker that receives the event outbox and may send requests; absent: no upstream sync."""

    host: str | None = Field(None, min_length=1, description="Upstream broker host name or address; or `hosts`.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port of `host`, 1..65535.")
    hosts: list[str] | None = Field(
        None,
        min_length=1,
        description="Instead of `host`/`port`: the nodes of one clustered broker as `host:port` (port default "
        "8883), tried in turn, the first first; one persistent session across them.",
    )
    mqtt_version: Literal["5", "3.1.1", "auto"] = Field(
        "auto",
        description='`"5"`, `"3.1.1"`, or `"auto"`: 5, falling back to 3.1.1 when the broker refuses 5 '
        "(NATS and RabbitMQ before 3.13 speak 3.1.1 only).",
    )
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
        problems: list[tuple[Loc, str]] = check_secret_source(self.password, self.password_file)
        if self.host is None and self.hosts is None:
            problems.append((("host",), "set host (and port) or hosts"))
        elif self.host is not None and self.hosts is not None:
            problems.append((("hosts",), "set either host (and port) or hosts, not both"))
        elif self.hosts is not None:
            if "port" in self.model_fields_set:
                problems.append((("port",), "goes with host; with hosts each entry carries its port"))
            seen: dict[tuple[str, int], int] = {}
            for i, text in enumerate(self.hosts):
                try:
                    node = parse_node(text)
                except ValueError as exc:
                    problems.append((("hosts", i), str(exc)))
                    continue
                if node in seen:
                    problems.append((("hosts", i), f"{text!r} is also hosts[{seen[node]}]"))
                seen.setdefault(node, i)
        if problems:
            raise Problems(problems)
        return self

    def nodes(self) -> list[tuple[str, int]]:
        """The broker nodes in the order they are tried."""
        if self.hosts is not None:
            return [parse_node(text) for text in self.hosts]
        assert self.host is not None
        return [(self.host, self.port)]
