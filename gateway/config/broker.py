"""`[broker]`: the local, device-side MQTT broker."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from gateway.config.base import Problems, StrictModel, check_secret_source, topic_filter_problem
from gateway.config.tls import TLSConfig


class BrokerConfig(StrictModel):
    """The local, device-side MQTT broker: the bundled one in-process, or an external one."""

    embedded: bool = Field(True, description="Start the bundled broker (amqtt, MQTT 3.1.1) in-process.")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the embedded broker binds to, or the external broker to connect to.",
    )
    port: int = Field(1883, ge=1, le=65535, description="TCP port, 1..65535.")
    username: str | None = Field(None, min_length=1, description="User name the gateway connects with.")
    password: str | None = Field(None, description="Password the gateway connects with.")
    password_file: str | None = Field(
        None, min_length=1, description="File whose first line is the password; instead of `password`."
    )
    tls: TLSConfig | None = Field(
        None,
        description="External broker: TLS toward it, always verified (`tls = {}`: against the system CAs). "
        "Embedded broker: `cert` + `key` make its listener TLS. Unset: plain TCP.",
    )
    acl_file: str | None = Field(
        None,
        min_length=1,
        description="Embedded broker only: a Mosquitto-style ACL file (`user`, `topic`, `pattern` with `%u`; rules "
        "before any `user` line are for anonymous clients); unset: the gateway's account may do everything, every "
        "other account publish to its own ingress topics, anonymous clients publish to the ingress filters and "
        "read the gateway's states and events.",
    )
    users_file: str | None = Field(
        None,
        min_length=1,
        description="Embedded broker only: `user:hash` lines with Argon2 hashes, written by "
        "`parking-gateway passwd FILE USER`; required unless `allow_anonymous`; needs `username`, the gateway's "
        "own account in it. Unset: the gateway logs in with an in-process account made at each start.",
    )
    mqtt_version: Literal["3.1.1", "5"] = Field(
        "5",
        description="External broker only: the protocol the gateway speaks to it. 5 lets requests carry a "
        "response topic and correlation data; 3.1.1 costs less CPU per message. The bundled broker is 3.1.1.",
    )
    response_topics: list[str] = Field(
        [],
        description="MQTT filters where an MQTT 5 request's response topic may point besides `R/response/#`; a "
        "request whose response topic lies elsewhere is answered on `R/response/<verb>` and counted as rejected "
        "`response_topic` (the gateway's account may publish where a requester may not).",
    )
    allow_anonymous: bool = Field(
        False,
        description="Embedded broker only: accept clients without credentials (fine for a demo on "
        "127.0.0.1, not for a site).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = check_secret_source(self.password, self.password_file)
        for i, topic_filter in enumerate(self.response_topics):
            problem = topic_filter_problem(topic_filter)
            if problem is not None:
                problems.append((("response_topics", i), problem))
        if self.embedded:
            if not self.allow_anonymous and self.users_file is None:
                problems.append((("users_file",), "required for the embedded broker unless allow_anonymous = true"))
            if self.users_file is not None and self.username is None:
                problems.append((("username",), "required with users_file: the gateway's own account in it"))
            if self.tls is not None:
                if self.tls.cert is None:
                    problems.append((("tls", "cert"), "the embedded broker's TLS listener needs cert and key"))
                if self.tls.ca is not None:
                    problems.append(
                        (
                            ("tls", "ca"),
                            "the embedded broker takes cert and key only (it does not ask for client "
                            "certificates); give the CA to its clients",
                        )
                    )
        else:
            for name in ("acl_file", "users_file"):
                if getattr(self, name) is not None:
                    problems.append(((name,), "only applies to the embedded broker (embedded = true)"))
        if problems:
            raise Problems(problems)
        return self
