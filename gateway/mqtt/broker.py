"""The bundled MQTT 3.1.1 broker (amqtt 0.12), run in the gateway's own event loop.

Users file (``users_file``): one ``username:hash`` per line, ``#`` comments allowed. amqtt 0.12 verifies
the hash with pwdlib and accepts Argon2 (``$argon2id$...``, what :func:`hash_password` writes) and,
deprecated, sha512-crypt (``$6$...``, as written by older amqtt tools or passlib) which only works on
Python < 3.13 because it needs the ``crypt`` module. bcrypt is not accepted by amqtt 0.12.

Access control: ``acl`` maps a username to the topic names it may PUBLISH to (MQTT filters, ``+``/``#``
allowed); a publish outside them is acknowledged and silently dropped by the broker. ``subscribe_acl``
does the same for subscriptions (a refused filter gets SUBACK 0x80); without it every authenticated
account may subscribe to anything. Anonymous clients, when allowed, are the user ``anonymous``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from argon2 import Type as Argon2Type
from pwdlib.hashers.argon2 import Argon2Hasher

__all__ = ["BrokerOptions", "BrokerStartError", "EmbeddedBroker", "hash_password", "make_acl"]

# OWASP's minimum Argon2id profile (19 MiB, 2 passes, 1 lane): amqtt verifies synchronously inside
# the event loop the lanes also run on, so a Pi must not spend 64 MiB and ~0.3 s per CONNECT.
_HASHER = Argon2Hasher(time_cost=2, memory_cost=19456, parallelism=1, type=Argon2Type.ID)


class BrokerStartError(Exception):
    """The bundled broker could not start; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    allow_anonymous: bool = False
    users_file: str | None = None
    acl: dict[str, list[str]] | None = None
    subscribe_acl: dict[str, list[str]] | None = None


def hash_password(password: str) -> str:
    """The hash part of a users-file line (``f"{user}:{hash_password(pw)}"``)."""
    return _HASHER.hash(password)


def make_acl(gateway_user: str, devices: dict[str, list[str]], operators: list[str], root: str) -> dict[str, list[str]]:
    """Publish ACL: the gateway everything, each device its own ingress topics, operators ``<root>/request/#``.

    ``root`` is the gateway's topic prefix ``<topic_root>/<gateway.id>``.
    """
    acl: dict[str, list[str]] = {user: list(topics) for user, topics in devices.items()}
    for user in operators:
        acl[user] = [f"{root}/request/#"]
    acl[gateway_user] = ["#"]
    return acl


class _AmqttNoise(logging.Filter):
    """Drops amqtt records that are not problems: a TCP probe without MQTT data is logged as an ERROR,
    and a failed start is logged with a traceback although it reaches the caller as BrokerStartError."""

    _PREFIXES = ("No data from", "Broker startup failed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self._PREFIXES):
            return False
        return not (message.startswith("Failed to initialize client session") and "No data" in message)


def _quiet_amqtt() -> None:
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker_logger = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _AmqttNoise) for f in broker_logger.filters):
        broker_logger.addFilter(_AmqttNoise())


def usernames(users_file: str) -> list[str]:
    try:
        lines = Path(users_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BrokerStartError(f"broker: cannot read users file {users_file}: {exc.strerror}") from exc
    return [line.split(":", 1)[0] for line in map(str.strip, lines) if line and not line.startswith("#")]


class EmbeddedBroker:
    """amqtt bound to one address, with an explicit plugin set (no $SYS, no packet logging)."""

    name = "broker"

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self._broker: Any = None

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self) -> dict[str, Any]:
        opts = self.options
        if not opts.allow_anonymous and opts.users_file is None:
            raise BrokerStartError("broker: allow_anonymous is false and no users_file is set: nobody could connect")
        plugins: dict[str, Any] = {}
        if opts.allow_anonymous:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        if opts.users_file is not None:
            plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {"password_file": opts.users_file}
        if opts.acl is not None or opts.subscribe_acl is not None:
            subscribe = opts.subscribe_acl
            if subscribe is None:
                users = usernames(opts.users_file) if opts.users_file is not None else []
                if opts.allow_anonymous:
                    users.append("anonymous")
                subscribe = {user: ["#"] for user in users}
            # amqtt's plugin Config has no `subscribe_acl` field; `acl` is its (deprecated) name for it.
            plugins["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {
                "publish_acl": opts.acl or {},
                "acl": subscribe,
            }
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{opts.port}"}},
            "plugins": plugins,
        }

    async def start(self) -> None:
        """Listen on host:port; raises BrokerStartError with a one-line reason."""
        if self._broker is not None:
            return
        from amqtt.broker import Broker  # imported late: amqtt pulls in websockets, transitions, dacite

        _quiet_amqtt()
        config = self._config()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                broker = Broker(config)
        except Exception as exc:
            raise BrokerStartError(f"broker: invalid configuration: {_root_cause(exc)}") from exc
        broker.stream_connected = _closing(broker.stream_connected)
        try:
            await broker.start()
        except Exception as exc:
            raise self._start_error(exc) from exc
        self._broker = broker

    def _start_error(self, exc: BaseException) -> BrokerStartError:
        where = f"{self.options.host}:{self.options.port}"
        cause = exc.__cause__
        if isinstance(cause, OSError):
            if cause.errno == errno.EADDRINUSE:
                return BrokerStartError(f"broker: port {self.options.port} on {self.options.host} is already in use")
            return BrokerStartError(f"broker: cannot listen on {where}: {cause.strerror or cause}")
        return BrokerStartError(f"broker: cannot start on {where}: {_root_cause(exc)}")

    async def run(self) -> None:
        """amqtt serves from its own tasks, started by `start`."""

    async def health(self) -> dict[str, Any]:
        return {"running": self.running}

    async def stop(self) -> None:
        """Close the listener and every client session; safe to call twice."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def _closing(
    stream_connected: Callable[..., Awaitable[None]],
) -> Callable[..., Coroutine[Any, Any, None]]:
    """amqtt 0.12 leaves the socket of a connection that never sent CONNECT open until garbage
    collection (ResourceWarning); close every connection's writer once amqtt is done with it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str) -> None:
        try:
            await stream_connected(reader, writer, listener_name=listener_name)
        finally:
            writer.close()

    return handle


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
