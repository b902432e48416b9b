"""The embedded broker's security, through the real amqtt broker built from a gateway config: retained
messages reach only the subscriptions they match, the ACL covers anonymous clients, wills and wildcards, and
an ACL without publish rules lets nobody publish."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.app import Gateway
from gateway.config import GatewayConfig, parse_config
from gateway.mqtt.broker import BrokerOptions, EmbeddedBroker, hash_password
from gateway.mqtt.local import broker_options
from tests.conftest import free_port

R = "parking/gw1"
DEADLINE = 5.0
PASSWORDS = {"gateway": "gw-secret", "op": "op-secret", "A-001": "s1-secret"}


def site(tmp_path: Path, broker: str) -> GatewayConfig:
    return parse_config(
        f"""
[gateway]
id = "gw1"
state_dir = "{tmp_path / "state"}"
[broker]
port = {free_port()}
{broker}
[[lots]]
id = "lot1"
  [[lots.zones]]
  id = "A"
  slots = [{{ ids = "A-001..A-002" }}]
[[gates]]
id = "in1"
lot = "lot1"
direction = "entry"
camera = "cam-in1"
"""
    )


def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("".join(f"{user}:{hash_password(pw)}\n" for user, pw in PASSWORDS.items()))
    return path


def acl_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acl"
    path.write_text(text)
    return path


@contextlib.asynccontextmanager
async def broker(cfg: GatewayConfig) -> AsyncIterator[BrokerOptions]:
    options = broker_options(cfg)
    async with EmbeddedBroker(options):
        yield options


def client(
    options: BrokerOptions, ident: str, user: str | None = None, password: str | None = None, **kw: object
) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", options.port, identifier=ident, username=user, password=password, **kw)  # type: ignore[arg-type]


def gateway_login(options: BrokerOptions) -> tuple[str, str]:
    """The gateway's own account: in-process without a users_file, else the file's."""
    account: tuple[str, str] | None = getattr(options, "gateway_account", None)
    return account or ("gateway", PASSWORDS["gateway"])


def as_gateway(options: BrokerOptions, ident: str = "gw", **kw: object) -> aiomqtt.Client:
    user, password = gateway_login(options)
    return client(options, ident, user, password, **kw)


async def collect(c: aiomqtt.Client, count: int) -> list[str]:
    got: list[str] = []
    async with asyncio.timeout(DEADLINE):
        async for message in c.messages:
            got.append(message.topic.value)
            if len(got) == count:
                break
    return got


async def collect_until(c: aiomqtt.Client, last: str) -> list[str]:
    """Topics received, in order, up to and including the first message on `last`."""
    got: list[str] = []
    async with asyncio.timeout(DEADLINE):
        async for message in c.messages:
            got.append(message.topic.value)
            if message.topic.value == last:
                return got
    raise AssertionError("unreachable")


def refused(codes: object) -> list[bool]:
    return [code.is_failure if hasattr(code, "is_failure") else code >= 0x80 for code in codes]  # type: ignore[attr-defined]


# --- retained messages


async def test_a_new_client_gets_no_retained_message_of_another_clients_subscription(tmp_path: Path) -> None:
    # The demo's broker: the live view has subscribed the gateway's status, availability and health.
    async with broker(site(tmp_path, "allow_anonymous = true")) as options, as_gateway(options) as gw:
        for topic in (f"{R}/status", f"{R}/lots/lot1/availability", f"{R}/health", f"{R}/slots/A-001"):
            await gw.publish(topic, b"x", qos=1, retain=True)
        async with client(options, "view") as view:
            await view.subscribe([(f"{R}/status", 1), (f"{R}/lots/+/availability", 1), (f"{R}/health", 1)])
            await collect(view, 3)
            async with client(options, "fresh") as fresh:
                # amqtt sent these on CONNECT, before handling this SUBSCRIBE and its own retained message.
                await fresh.subscribe([("nothing/here", 1), (f"{R}/slots/A-001", 1)])
                assert await collect_until(fresh, f"{R}/slots/A-001") == [f"{R}/slots/A-001"]


async def test_a_resumed_session_gets_the_retained_messages_of_its_own_subscriptions_only(tmp_path: Path) -> None:
    async with broker(site(tmp_path, "allow_anonymous = true")) as options, as_gateway(options) as gw:
        for topic in (f"{R}/status", f"{R}/slots/A-001"):
            await gw.publish(topic, b"x", qos=1, retain=True)
        async with client(options, "other") as other:
            await other.subscribe(f"{R}/status", qos=1)
            async with client(options, "display", clean_session=False) as display:
                await display.subscribe(f"{R}/slots/+", qos=1)
                assert await collect_until(display, f"{R}/slots/A-001") == [f"{R}/slots/A-001"]
            async with client(options, "display", clean_session=False) as display:
                await display.subscribe("nothing/here", qos=1)  # a round trip after the CONNECT-time replay
                await gw.publish(f"{R}/slots/A-002", b"y", qos=1)
                assert await collect_until(display, f"{R}/slots/A-002") == [f"{R}/slots/A-001", f"{R}/slots/A-002"]


# --- who may use a client id

# Accounts that may read the gateway's state (op) and only write their own sensor, plus anonymous readers.
SESSIONS_ACL = f"topic read {R}/slots/+\nuser gateway\ntopic readwrite #\nuser op\ntopic read {R}/#\n"
SESSIONS_ACL += "user A-001\ntopic write sensors/A-001/state\n"


def accounts_site(tmp_path: Path, *, anonymous: bool) -> GatewayConfig:
    acl = acl_file(tmp_path, SESSIONS_ACL)
    return site(
        tmp_path,
        f'users_file = "{users_file(tmp_path)}"\nusername = "gateway"\nacl_file = "{acl}"\n'
        f"allow_anonymous = {str(anonymous).lower()}",
    )


async def refusal(c: aiomqtt.Client) -> str:
    """The CONNACK refusal of a client that must not connect (identifier rejected reads as MQTT 5's 133)."""
    with pytest.raises(aiomqtt.MqttError) as info:
        async with c:
            pass
    return str(info.value)


async def test_only_the_gateways_account_connects_with_the_gateways_client_ids(tmp_path: Path) -> None:
    async with broker(accounts_site(tmp_path, anonymous=True)) as options, as_gateway(options, "gw1-local") as gw:
        await gw.subscribe("sensors/+/state", qos=1)
        for user, password, ident, clean in (
            ("A-001", PASSWORDS["A-001"], "gw1-local", True),  # amqtt would drop the link's subscriptions
            ("A-001", PASSWORDS["A-001"], "gw1-local", False),  # amqtt would take the link's connection over
            ("op", PASSWORDS["op"], "gw1-local-in", False),
            (None, None, "gw1-local", True),
            (None, None, "gw1-anything", False),
        ):
            reason = await refusal(client(options, ident, user, password, clean_session=clean))
            assert "Client identifier not valid" in reason, (user, ident, reason)
        # A wrong password is refused before the client id counts: amqtt would first have deleted the session.
        assert "Not authorized" in await refusal(client(options, "gw1-local", "gateway", "guess"))
        async with (
            as_gateway(options, "gw1-local-in"),  # the gateway's own account may use every id of the gateway
            client(options, "A-001", "A-001", PASSWORDS["A-001"]) as device,
        ):
            await device.publish("sensors/A-001/state", b"{}", qos=1)
            assert await collect_until(gw, "sensors/A-001/state") == ["sensors/A-001/state"]


async def test_a_connected_session_is_taken_over_only_by_its_own_account(tmp_path: Path) -> None:
    async with broker(accounts_site(tmp_path, anonymous=True)) as options, as_gateway(options) as gw:
        async with client(options, "display", "op", PASSWORDS["op"], clean_session=False) as display:
            await display.subscribe(f"{R}/slots/+", qos=1)
            for user, password, clean in (
                ("A-001", PASSWORDS["A-001"], False),
                ("A-001", PASSWORDS["A-001"], True),
                ("gateway", PASSWORDS["gateway"], False),  # not even the gateway's account: the session is op's
                (None, None, False),  # an anonymous client may read R/slots/+, but not take op's session
                (None, None, True),
            ):
                reason = await refusal(client(options, "display", user, password, clean_session=clean))
                assert "Client identifier not valid" in reason, (user, clean, reason)
            await gw.publish(f"{R}/slots/A-001", b"x", qos=1)
            assert await collect_until(display, f"{R}/slots/A-001") == [f"{R}/slots/A-001"]
        async with client(options, "display", "op", PASSWORDS["op"], clean_session=False) as display:
            await display.subscribe(f"{R}/slots/+", qos=1)  # op itself, as ever
            await gw.publish(f"{R}/slots/A-002", b"y", qos=1)
            assert await collect_until(display, f"{R}/slots/A-002") == [f"{R}/slots/A-002"]


async def test_queued_messages_reach_only_the_account_whose_session_they_wait_in(tmp_path: Path) -> None:
    # Without anonymous clients: amqtt queues nothing for an offline session when allow_anonymous is set.
    async with broker(accounts_site(tmp_path, anonymous=False)) as options, as_gateway(options) as gw:
        async with client(options, "display", "op", PASSWORDS["op"], clean_session=False) as display:
            await display.subscribe(f"{R}/slots/+", qos=1)
        await gw.publish(f"{R}/slots/A-001", b"x", qos=1)
        await gw.publish(f"{R}/slots/A-002", b"y", qos=1)
        for clean in (False, True):  # A-001 may read nothing: it would get op's queue, or discard it
            reason = await refusal(client(options, "display", "A-001", PASSWORDS["A-001"], clean_session=clean))
            assert "Client identifier not valid" in reason, (clean, reason)
        async with client(options, "display", "op", PASSWORDS["op"], clean_session=False) as display:
            assert await collect_until(display, f"{R}/slots/A-002") == [f"{R}/slots/A-001", f"{R}/slots/A-002"]


# --- who may publish and subscribe


async def test_anonymous_clients_send_device_input_but_no_request(tmp_path: Path) -> None:
    # allow_anonymous without users_file or acl_file (the demo): devices publish, nobody requests.
    async with broker(site(tmp_path, "allow_anonymous = true")) as options, as_gateway(options) as gw:
        await gw.subscribe("#", qos=1)
        for anonymous in (client(options, "anon"), client(options, "claims-a-name", "op", "any")):
            async with anonymous:
                for topic in (
                    f"{R}/request/block",
                    f"{R}/gates/in1/open",
                    f"{R}/status",
                    "sensors/A-001/state",
                    "cameras/cam-in1/reads",
                    "v3/app@tenant/devices/A-002/up",
                    "elsewhere/x",
                    "sensors/A-002/state",
                ):
                    await anonymous.publish(topic, b"{}", qos=1)
                assert await collect_until(gw, "sensors/A-002/state") == [
                    "sensors/A-001/state",
                    "cameras/cam-in1/reads",
                    "v3/app@tenant/devices/A-002/up",
                    "sensors/A-002/state",
                ]
                codes = await anonymous.subscribe(
                    [
                        (f"{R}/status", 1),
                        (f"{R}/lots/+/availability", 1),
                        (f"{R}/events", 1),
                        (f"{R}/request/#", 1),
                        (f"{R}/response/#", 1),
                        ("sensors/+/state", 1),
                        (f"{R}/#", 1),
                        ("#", 1),
                    ]
                )
                assert refused(codes) == [False, False, False, True, True, True, True, True]
        with pytest.raises(aiomqtt.MqttError, match="Not authorized"):
            async with client(options, "impostor", gateway_login(options)[0], "guess"):
                pass


async def test_an_acl_file_applies_to_anonymous_clients(tmp_path: Path) -> None:
    acl = acl_file(tmp_path, f"topic write sensors/+/state\ntopic read {R}/lots/+/availability\n")
    cfg = site(tmp_path, f'allow_anonymous = true\nacl_file = "{acl}"')
    async with broker(cfg) as options, as_gateway(options) as gw:
        await gw.subscribe("#", qos=1)
        async with client(options, "anon") as anon:
            for topic in ("cameras/cam-in1/reads", f"{R}/request/enter", "sensors/A-001/state"):
                await anon.publish(topic, b"{}", qos=1)
            assert await collect_until(gw, "sensors/A-001/state") == ["sensors/A-001/state"]
            codes = await anon.subscribe([(f"{R}/lots/lot1/availability", 1), (f"{R}/status", 1)])
            assert refused(codes) == [False, True]


async def test_a_plus_in_a_subscribe_rule_never_grants_a_hash(tmp_path: Path) -> None:
    acl = acl_file(
        tmp_path, f"user gateway\ntopic readwrite #\nuser op\ntopic read {R}/+\ntopic read a\ntopic read a/+/#\n"
    )
    cfg = site(tmp_path, f'users_file = "{users_file(tmp_path)}"\nusername = "gateway"\nacl_file = "{acl}"')
    async with broker(cfg) as options, client(options, "op", "op", PASSWORDS["op"]) as op:
        filters = [f"{R}/#", f"{R}/+/#", "#", f"{R}/+", f"{R}/status", f"{R}/+/+", "parking/+/status", "a/#"]
        codes = await op.subscribe([(f, 1) for f in filters])
        assert refused(codes) == [True, True, True, False, False, True, True, False]


async def test_an_acl_without_publish_rules_lets_nobody_publish(tmp_path: Path) -> None:
    acl = acl_file(tmp_path, "user gateway\ntopic read #\nuser op\ntopic read #\n")
    cfg = site(tmp_path, f'users_file = "{users_file(tmp_path)}"\nusername = "gateway"\nacl_file = "{acl}"')
    async with broker(cfg) as options, as_gateway(options) as gw, client(options, "op", "op", PASSWORDS["op"]) as op:
        await gw.subscribe("#", qos=1)
        await op.publish(f"{R}/request/block", b"{}", qos=1)
        await op.publish("sensors/A-001/state", b"{}", qos=1)
        await gw.publish("sensors/A-002/state", b"{}", qos=1)
        # Nothing can pass to mark the end of the drops: wait as long as a delivery takes many times over.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                message = await anext(aiter(gw.messages))
                pytest.fail(f"delivered: {message.topic.value}")


async def leave_a_will(port: int, client_id: str, topic: str, payload: bytes) -> None:
    """CONNECT with a will, then end the connection without DISCONNECT; returns once the broker closed it."""

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x02 | 0x04 | 0x08  # clean session, will, will QoS 1
    body = field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body += field(client_id.encode()) + field(topic.encode()) + field(payload)
    assert len(body) < 128
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(bytes([0x10, len(body)]) + body)
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        writer.write_eof()
        async with asyncio.timeout(DEADLINE):
            while await reader.read(1024):  # the broker closes after handling the disconnect and its will
                pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_a_will_is_published_only_where_its_client_may_publish(tmp_path: Path) -> None:
    async with broker(site(tmp_path, "allow_anonymous = true")) as options, as_gateway(options) as gw:
        await gw.subscribe("#", qos=1)
        block = b'{"transaction": "t1", "slot": "A-001", "reason": "will"}'
        await leave_a_will(options.port, "bad", f"{R}/request/block", block)
        await leave_a_will(options.port, "good", "sensors/A-001/state", b'{"occupied": true}')
        assert await collect_until(gw, "sensors/A-001/state") == ["sensors/A-001/state"]


# --- the filter-covers-filter check, against brute force over a small world of topics

_LEVEL = st.sampled_from(["a", "b", "$s", "+"])
_FILTER = st.builds(
    lambda levels, hash_: "/".join([*levels, "#"] if hash_ else levels) or "#",
    st.lists(_LEVEL, min_size=0, max_size=3),
    st.booleans(),
)


def _topics(depth: int) -> list[str]:
    # "c" stands for every level that no filter names; "$s" only ever comes first in a real topic.
    out = [[x] for x in ("a", "b", "c", "$s")]
    every = list(out)
    for _ in range(depth - 1):
        out = [[*t, x] for t in out for x in ("a", "b", "c", "$s")]
        every += out
    return ["/".join(t) for t in every]


TOPICS = _topics(5)


@settings(max_examples=300, deadline=None)
@given(granted=st.lists(_FILTER, min_size=0, max_size=3), requested=_FILTER)
def test_covers_is_exactly_every_matched_topic_matched_by_a_grant(granted: list[str], requested: str) -> None:
    from gateway.mqtt.acl import covers, valid_filter
    from gateway.mqtt.topics import match

    def matches(topic_filter: str, topic: str) -> bool:
        if topic.startswith("$") and topic_filter[0] in "+#":
            return False
        return match(topic_filter, topic) is not None

    assert valid_filter(requested) and all(valid_filter(g) for g in granted)
    expected = all(any(matches(g, t) for g in granted) for t in TOPICS if matches(requested, t))
    assert covers(granted, requested) == expected


def test_an_acl_file_with_an_invalid_filter_is_an_error(tmp_path: Path) -> None:
    from gateway.mqtt.acl import AclError, parse_acl

    for bad in ("topic read a/#/b", "topic write a+", "user x\npattern write sensors/%u/#/state"):
        with pytest.raises(AclError, match="not a valid MQTT topic filter"):
            parse_acl(bad, ["x"])
    with pytest.raises(AclError, match="cannot stand for a topic level"):
        parse_acl("pattern write sensors/%u/state", ["a/b"])


# --- warnings


def _cli_config(tmp_path: Path, broker: str) -> Path:
    path = tmp_path / f"gw-{abs(hash(broker))}.toml"
    path.write_text(
        f'[gateway]\nid = "gw1"\nstate_dir = "{tmp_path / "state"}"\n[broker]\n{broker}\n'
        '[[lots]]\nid = "lot1"\n[[lots.zones]]\nid = "A"\nslots = [{ ids = "A-001" }]\n'
    )
    return path


def test_check_config_warns_of_anonymous_clients_beyond_loopback(tmp_path: Path) -> None:
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        path = _cli_config(tmp_path, f'host = "{host}"\nallow_anonymous = true')
        res = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        assert ("warning: broker: allow_anonymous = true with host = '0.0.0.0'" in res.stderr) == warned, res.stderr


def test_which_binds_are_beyond_loopback(tmp_path: Path) -> None:
    from gateway.mqtt.local import broker_warnings

    users = users_file(tmp_path)
    for broker, warned in (
        ('host = "192.0.2.10"\nallow_anonymous = true', True),
        ('host = "::"\nallow_anonymous = true', True),
        ('host = "gateway.site.example"\nallow_anonymous = true', True),
        ('host = "127.0.0.2"\nallow_anonymous = true', False),
        ('host = "::1"\nallow_anonymous = true', False),
        ('host = "localhost"\nallow_anonymous = true', False),
        (f'host = "0.0.0.0"\nusers_file = "{users}"\nusername = "gateway"', False),
        ('embedded = false\nhost = "broker.example"', False),
    ):
        assert bool(broker_warnings(site(tmp_path, broker))) == warned, broker


async def test_the_daemon_warns_at_start_of_anonymous_clients_beyond_loopback(tmp_path: Path) -> None:
    cfg = site(tmp_path, 'host = "0.0.0.0"\nallow_anonymous = true')
    with capture_logs() as logs:
        gw = Gateway(cfg)
        task = asyncio.create_task(gw.run())
        try:
            await gw.wait_ready()
        finally:
            gw.stop()
            await asyncio.wait_for(task, 20)
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert any(w.startswith("broker: allow_anonymous = true with host = '0.0.0.0'") for w in warnings), logs
