"""The upstream broker connection, as the config describes it: nodes, protocol, session, credentials, TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gateway.config import GatewayConfig
from gateway.mqtt.link import LinkOptions
from gateway.mqtt.tls import tls_options
from gateway.mqtt.topics import Topics

# The session upstream outlives a connection by a day (contract: at least a day). Requests queued for us
# longer than that are dropped by the broker, which is as well: an `open_gate` from yesterday should not run.
SESSION_EXPIRY = 86400
_PROTOCOLS: dict[str, Literal[3, 5, "auto"]] = {"5": 5, "3.1.1": 3, "auto": "auto"}


def upstream_topics(config: GatewayConfig) -> Topics:
    """R upstream: `<upstream topic_root>/<gateway.id>`."""
    root = config.upstream_topic_root()
    assert root is not None, "no [upstream] in the config"
    return Topics(f"{root}/{config.gateway.id}")


def link_options(
    config: GatewayConfig,
    *,
    subscriptions: tuple[tuple[str, int], ...],
    extra_inflight: int,
    backoff_initial: float = 0.5,
    backoff_max: float = 30.0,
    timeout: float = 10.0,
) -> LinkOptions:
    up = config.upstream
    assert up is not None, "no [upstream] in the config"
    (host, port), *more = up.nodes()
    return LinkOptions(
        host=host,
        port=port,
        more_hosts=tuple(more),
        client_id=f"{config.gateway.id}-upstream",
        status_topic=upstream_topics(config).status,
        username=up.username,
        password=_secret(up.password, up.password_file),
        tls=tls_options(up.tls),  # `tls = {}`: verified against the system CAs
        keepalive=up.keepalive,
        timeout=timeout,
        subscriptions=subscriptions,
        protocol=_PROTOCOLS[up.mqtt_version],
        persistent=True,
        session_expiry=SESSION_EXPIRY,
        extra_inflight=extra_inflight,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )


def _secret(password: str | None, password_file: str | None) -> str | None:
    if password_file is not None:
        return Path(password_file).read_text(encoding="utf-8").strip()
    return password
