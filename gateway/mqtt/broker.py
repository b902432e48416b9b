"""The bundled MQTT 3.1.1 broker (amqtt 0.12.1), run in the gateway's own event loop.

Users file (``users_file``): one ``username:hash`` per line, ``#`` comments allowed. amqtt 0.12 verifies
the hash with pwdlib and accepts Argon2 (``$argon2id$...``, what :func:`hash_password` writes) and,
deprecated, sha512-crypt (``$6$...``, as written by older amqtt tools or passlib) which only works on
Python < 3.13 because it needs the ``crypt`` module. bcrypt is not accepted by amqtt 0.12.

``gateway_account``: a (username, password) pair checked in memory, for the gateway's own link when there is
no users_file (then it is the only account; every other client is anonymous).

Access control (``acl``, see gateway.mqtt.acl): publishing, subscribing and delivery are checked against the
rules of the client's identity, anonymous clients included; a publish outside them is acknowledged and
silently dropped by the broker, a refused filter gets SUBACK 0x80. ``acl=None`` means no access control
(the tests' and benchmarks' open broker; the daemon always passes rules).

Client ids (see gateway.mqtt.amqtt_ext): a session belongs to the identity that created it, and only that
identity may resume it or take its connection over; the ids starting with ``gateway_prefix`` are only for the
account ``gateway_user``. Any other CONNECT with such an id is refused ("identifier rejected").

TLS: ``tls_cert`` + ``tls_key`` make the listener TLS (client certificates are not asked for).
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

from gateway.mqtt.acl import ANONYMOUS, Acl

__all__ = ["BrokerOptions", "BrokerStartError", "EmbeddedBroker", "hash_password"]

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
    acl: Acl | None = None
    gateway_account: tuple[str, str] | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # The gateway's own links connect with client ids starting with this prefix (`<gateway.id>-`): only the
    # account `gateway_user` may use them. None: no reserved ids.
    gateway_prefix: str | None = None
    gateway_user: str | None = None


def hash_password(password: str) -> str:
    """The hash part of a users-file line (``f"{user}:{hash_password(pw)}"``)."""
    return _HASHER.hash(password)


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

    def _config(self) -> tuple[dict[str, Any], list[str]]:
        """amqtt's configuration, and the accounts: the users whose password it checks."""
        opts = self.options
        if not opts.allow_anonymous and opts.users_file is None:
            raise BrokerStartError("broker: allow_anonymous is false and no users_file is set: nobody could connect")
        if opts.gateway_account is not None and opts.users_file is not None:
            # amqtt's file plugin refuses every name it does not hold: the in-memory account could not log in.
            raise BrokerStartError("broker: the gateway's in-process account is only for a broker without users_file")
        plugins: dict[str, Any] = {}
        accounts: list[str] = []
        if opts.allow_anonymous:
            plugins["amqtt.plugins.authentication.AnonymousAuthPlugin"] = {"allow_anonymous": True}
        if opts.users_file is not None:
            plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {"password_file": opts.users_file}
            accounts += usernames(opts.users_file)
        if opts.gateway_account is not None:
            user, password = opts.gateway_account
            plugins["gateway.mqtt.amqtt_ext.GatewayAccountPlugin"] = {"username": user, "password": password}
            accounts.append(user)
        if opts.acl is not None:
            plugins["gateway.mqtt.amqtt_ext.AclPlugin"] = {
                "publish": opts.acl.publish,
                "subscribe": opts.acl.subscribe,
                "accounts": [user for user in accounts if user != ANONYMOUS],
            }
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{opts.port}"}
        if opts.tls_cert is not None or opts.tls_key is not None:
            listener.update(ssl=True, certfile=opts.tls_cert, keyfile=opts.tls_key)
        return {"listeners": {"default": listener}, "plugins": plugins}, accounts

    async def start(self) -> None:
        """Listen on host:port; raises BrokerStartError with a one-line reason."""
        if self._broker is not None:
            return
        try:
            from gateway.mqtt.amqtt_ext import GatewayBroker  # late: amqtt pulls in websockets, transitions, dacite
        except ImportError as exc:
            raise BrokerStartError(f"broker: {exc}") from exc

        _quiet_amqtt()
        config, accounts = self._config()
        opts = self.options
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                broker = GatewayBroker(
                    config, accounts=accounts, gateway_user=opts.gateway_user, gateway_prefix=opts.gateway_prefix
                )
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
