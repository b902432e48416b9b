"""The bundled amqtt broker: lifecycle, port conflicts, authentication and the publish ACL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from gateway.mqtt.acl import Acl
from gateway.mqtt.broker import BrokerOptions, BrokerStartError, EmbeddedBroker, hash_password

ROOT = "parking/gw1"
DEADLINE = 5.0
PASSWORDS = {"gw": "gw-secret", "dev1": "d1-secret", "dev2": "d2-secret", "op": "op-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(port: int, ident: str, user: str | None = None, password: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, identifier=ident, username=user, password=password)


def login(port: int, user: str) -> aiomqtt.Client:
    return client(port, user, user, PASSWORDS[user])


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users"
    lines = ["# gateway accounts", *(f"{user}:{hash_password(pw)}" for user, pw in PASSWORDS.items())]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
async def secured(users_file: str) -> AsyncIterator[int]:
    publish = {"gw": ["#"], "dev1": ["sensors/S1/state"], "dev2": ["sensors/S2/state"], "op": [f"{ROOT}/request/#"]}
    acl = Acl(publish=publish, subscribe={"gw": ["#"]})
    options = BrokerOptions(port=free_port(), allow_anonymous=False, users_file=users_file, acl=acl)
    async with EmbeddedBroker(options):
        yield options.port


async def test_start_stop_is_clean_and_idempotent() -> None:
    baseline = asyncio.all_tasks()
    broker = EmbeddedBroker(BrokerOptions(port=free_port(), allow_anonymous=True))
    await broker.start()
    assert broker.running
    async with client(broker.options.port, "c1") as c:
        await c.publish("a/b", b"x", qos=1)
    await broker.stop()
    await broker.stop()
    assert not broker.running
    async with asyncio.timeout(DEADLINE):
        while asyncio.all_tasks() - baseline:  # noqa: ASYNC110 (waits out tasks the broker owned)
            await asyncio.sleep(0.01)
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker.options.port, "c2"):
            pass


async def test_port_in_use_is_a_clear_error() -> None:
    port = free_port()
    async with EmbeddedBroker(BrokerOptions(port=port, allow_anonymous=True)):
        with pytest.raises(BrokerStartError, match=rf"^broker: port {port} on 127\.0\.0\.1 is already in use$"):
            await EmbeddedBroker(BrokerOptions(port=port, allow_anonymous=True)).start()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(BrokerStartError, match="already in use"):
            await EmbeddedBroker(BrokerOptions(port=port, allow_anonymous=True)).start()


async def test_refuses_to_start_when_nobody_could_connect(tmp_path: Path) -> None:
    with pytest.raises(BrokerStartError, match="no users_file"):
        await EmbeddedBroker(BrokerOptions(port=free_port())).start()
    missing = tmp_path / "absent"
    with pytest.raises(BrokerStartError, match="absent"):
        await EmbeddedBroker(BrokerOptions(port=free_port(), users_file=str(missing))).start()


async def test_anonymous_unknown_and_wrong_password_are_refused(secured: int) -> None:
    for attempt in (
        client(secured, "anon"),
        client(secured, "stranger", "stranger", "x"),
        client(secured, "dev1", "dev1", "wrong"),
    ):
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            async with attempt:
                pass
    async with login(secured, "dev1"):
        pass


async def test_devices_publish_only_their_own_topics(secured: int) -> None:
    async with login(secured, "gw") as gw:
        await gw.subscribe("#", qos=1)
        async with login(secured, "dev1") as dev1, login(secured, "op") as op:
            await dev1.publish(f"{ROOT}/request/open_gate", b"dev1-request", qos=1)
            await dev1.publish("sensors/S2/state", b"dev1-as-S2", qos=1)
            await dev1.publish("sensors/S1/state", b"dev1-own", qos=1)
            await op.publish("sensors/S1/state", b"op-as-sensor", qos=1)
            await op.publish(f"{ROOT}/request/open_gate", b"op-request", qos=1)
            got: list[tuple[str, bytes]] = []
            async with asyncio.timeout(DEADLINE):
                async for message in gw.messages:
                    got.append((message.topic.value, bytes(message.payload)))
                    if message.payload == b"op-request":
                        break
    assert got == [("sensors/S1/state", b"dev1-own"), (f"{ROOT}/request/open_gate", b"op-request")]


async def test_subscribe_acl_refuses_a_filter(users_file: str) -> None:
    acl = Acl(publish={"gw": ["#"]}, subscribe={"gw": ["#"], "op": [f"{ROOT}/#"]})
    options = BrokerOptions(port=free_port(), users_file=users_file, acl=acl)
    async with EmbeddedBroker(options), login(options.port, "op") as op:
        granted = await op.subscribe([(f"{ROOT}/response/#", 1), ("sensors/#", 1)])
        assert [code.is_failure for code in granted] == [False, True]  # type: ignore[union-attr]


def test_hash_password_is_salted_argon2id() -> None:
    first, second = hash_password("pw"), hash_password("pw")
    assert first.startswith("$argon2id$")
    assert first != second


async def test_a_bare_tcp_probe_is_not_logged_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with EmbeddedBroker(BrokerOptions(port=port, allow_anonymous=True)):
        with contextlib.closing(socket.create_connection(("127.0.0.1", port))):
            pass
        # A full MQTT exchange afterwards gives the broker's loop time to handle the probe's EOF.
        async with client(port, "after-probe") as c:
            await c.publish("a", b"x", qos=1)
    assert [r for r in caplog.records if r.name.startswith("amqtt") and r.levelno >= logging.WARNING] == []
