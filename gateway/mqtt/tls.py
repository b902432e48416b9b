"""TLS toward an MQTT broker, verified whatever the options: the local link and the upstream forwarder both
build their context here.

There is no option that turns verification off. The peer's certificate must chain to `ca` (the system's CAs
when it is unset) and name the host dialled; or, for the gateway's own link to its embedded broker, be
exactly the listener's certificate (`pin`): that link dials the bind address, which a certificate rarely
names, and a pinned certificate is a stronger check than a CA and a name.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway.config.tls import TLSConfig

__all__ = ["TlsOptions", "client_context", "tls_options"]

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TlsOptions:
    ca: str | None = None  # PEM CA file; None: the system's CAs
    cert: str | None = None  # client certificate (PEM), with `key`
    key: str | None = None
    pin: str | None = None  # instead of `ca` and the host name: trust exactly the first certificate of this file


def client_context(options: TlsOptions) -> ssl.SSLContext:
    """A client context that requires a verified server certificate; raises OSError or ssl.SSLError on a file
    that cannot be read or used."""
    if options.pin is not None:
        first = _PEM_CERT.search(Path(options.pin).read_text(encoding="ascii"))
        if first is None:
            raise ssl.SSLError(f"{options.pin}: no PEM certificate")
        # Only the leaf: trusting the chain in the file too would accept any certificate its CA signed.
        context = ssl.create_default_context(cadata=first.group(0))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        context.check_hostname = False
    else:
        context = ssl.create_default_context(cafile=options.ca)
    if options.cert is not None:
        context.load_cert_chain(options.cert, options.key)
    return context


def tls_options(config: TLSConfig | None) -> TlsOptions | None:
    """`tls = {...}` of `[broker]` (external) or `[upstream]`; `{}` is verified TLS against the system CAs."""
    if config is None:
        return None
    return TlsOptions(ca=config.ca, cert=config.cert, key=config.key)
