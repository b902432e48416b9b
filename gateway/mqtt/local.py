"""The local broker as the config describes it: the embedded broker's options and rules, the TLS of the
gateway's own link to it, and the warnings an operator should see at start and from check-config."""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.mqtt.acl import default_acl, load_acl
from gateway.mqtt.broker import BrokerOptions, usernames
from gateway.mqtt.tls import TlsOptions, tls_options

__all__ = ["broker_options", "broker_warnings", "local_tls"]

# The name of the gateway's in-process account when [broker] username is unset and there is no users_file.
GATEWAY_USER = "gateway"


def broker_options(config: GatewayConfig) -> BrokerOptions:
    """The embedded broker with its rules (gateway.mqtt.acl); raises BrokerStartError or AclError."""
    b = config.broker
    users = usernames(b.users_file) if b.users_file is not None else []
    account: tuple[str, str] | None = None
    gateway_user = b.username
    if b.users_file is None:
        # Nothing could check a password: the gateway gets an account only this process knows.
        gateway_user = b.username or GATEWAY_USER
        account = (gateway_user, secrets.token_urlsafe(32))
    if b.acl_file is not None:
        acl = load_acl(Path(b.acl_file), users)
        if account is not None:
            acl.grant(account[0], "readwrite", "#")
    else:
        root = f"{config.gateway.topic_root}/{config.gateway.id}"
        acl = default_acl(gateway_user, users, config.ingress.by_kind(), root=root, anonymous=b.allow_anonymous)
    return BrokerOptions(
        host=b.host,
        port=b.port,
        allow_anonymous=b.allow_anonymous,
        users_file=b.users_file,
        acl=acl,
        gateway_account=account,
        tls_cert=b.tls.cert if b.tls else None,
        tls_key=b.tls.key if b.tls else None,
        gateway_prefix=f"{config.gateway.id}-",
        gateway_user=gateway_user,
    )


def local_tls(config: GatewayConfig, broker: BrokerOptions | None) -> TlsOptions | None:
    """TLS of the gateway's link to the local broker: to its own embedded listener, that exact certificate."""
    if broker is not None:
        return TlsOptions(pin=broker.tls_cert) if broker.tls_cert is not None else None
    return tls_options(config.broker.tls)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def broker_warnings(config: GatewayConfig) -> list[str]:
    """Risky but valid settings: an embedded broker that takes anonymous clients from the network."""
    b = config.broker
    if b.embedded and b.allow_anonymous and not _loopback(b.host):
        return [
            f"broker: allow_anonymous = true with host = {b.host!r}: anyone who reaches this address may publish "
            "device input (sensor states, camera reads); bind 127.0.0.1, or set users_file and "
            "allow_anonymous = false"
        ]
    return []
