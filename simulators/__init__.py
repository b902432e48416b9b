"""Simulated field devices that speak the wire formats of the contract (§3.1) over real MQTT.

They share nothing with the gateway but the spec: no imports from `gateway` or `drivers`.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime

import aiomqtt

__all__ = ["make_client", "rfc3339"]


def make_client(
    host: str,
    port: int,
    identifier: str,
    *,
    username: str | None = None,
    password: str | None = None,
) -> aiomqtt.Client:
    """An MQTT 3.1.1 client for a simulator; call inside the running loop (aiomqtt binds to it)."""
    client = aiomqtt.Client(
        host,
        port,
        identifier=identifier,
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V311,
        # Nagle meets delayed ACK: without this a QoS 1 round trip costs ~40-90 ms (design.md).
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    # A load generator keeps many publishes in flight; the default threshold logs a warning for each.
    client.pending_calls_threshold = 100_000
    return client


def rfc3339(epoch: float) -> str:
    """`2026-11-25T10:00:00.123Z` for an epoch time in seconds."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
