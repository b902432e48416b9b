"""`tls = {...}` of `[broker]` and `[upstream]`."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from gateway.config.base import Problems, StrictModel


class TLSConfig(StrictModel):
    """TLS for an MQTT connection: CA to verify the peer, and an optional client certificate."""

    ca: str | None = Field(None, min_length=1, description="CA certificate file (PEM); unset: the system CAs.")
    cert: str | None = Field(
        None,
        min_length=1,
        description="Certificate file (PEM): the client certificate, or for the embedded broker its "
        "listener's certificate; needs `key`.",
    )
    key: str | None = Field(None, min_length=1, description="Private key file (PEM) of `cert`; needs `cert`.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> Self:
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise Problems([((missing,), "cert and key go together: set both or neither")])
        return self
