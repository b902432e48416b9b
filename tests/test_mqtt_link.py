"""MqttLink against real brokers: Mosquitto (subprocess) and the bundled amqtt (in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt.link import Incoming, LinkOptions, MqttLink, Outlet

STATUS = "parking/gw1/status"
DEADLINE = 5.0


class Address(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...


class MosquittoProcess(Protocol):
    """conftest's MosquittoProcess, as far as these tests use it."""

    @property
    def address(self) -> Address: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class Broker(Protocol):
    @property
    def address(self) -> Address: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class _Mosquitto:
    """The mosquitto fixture with the amqtt fixture's async stop()/start()."""

    def __init__(self, proc: MosquittoProcess) -> None:
        self._proc = proc

    @property
    def address(self) -> Address:
        return self._proc.address

    async def start(self) -> None:
        await asyncio.to_thread(self._proc.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self._proc.stop)


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> Broker:
    if request.param == "mosquitto":
        return _Mosquitto(request.getfixturevalue("mosquitto"))
    amqtt: Broker = request.getfixturevalue("amqtt_broker")
    return amqtt


def options(broker: Broker, **overrides: object) -> LinkOptions:
    base: dict[str, object] = {
        "host": broker.address.host,
        "port": broker.address.port,
        "client_id": "gw1-local",
        "status_topic": STATUS,
        "backoff_initial": 0.05,
        "backoff_max": 0.3,
    }
    base.update(overrides)
    return LinkOptions(**base)  # type: ignore[arg-type]


class Gate:
    """An on_connect callback that holds the link, before it sends anything queued, until opened."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.opened.set()
        self.connects = 0

    async def __call__(self) -> None:
        self.connects += 1
        await self.opened.wait()


@contextlib.asynccontextmanager
async def running(link: MqttLink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def observer(
    broker: Broker, *filters: str, ident: str = "observer"
) -> AsyncIterator[asyncio.Queue[aiomqtt.Message]]:
    """A plain aiomqtt client collecting every message on `filters`."""
    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
    async with aiomqtt.Client(broker.address.host, broker.address.port, identifier=ident) as client:
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                queue.put_nowait(message)

        task = asyncio.create_task(collect())
        try:
            yield queue
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def next_on(queue: asyncio.Queue[aiomqtt.Message], topic: str) -> aiomqtt.Message:
    """The next message on `topic`, skipping others; fails after DEADLINE."""
    async with asyncio.timeout(DEADLINE):
        while True:
            message = await queue.get()
            if message.topic.value == topic:
                return message


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():  # noqa: ASYNC110 (polls state owned by the code under test)
            await asyncio.sleep(0.01)


async def retained_value(broker: Broker, topic: str, ident: str = "fresh") -> bytes:
    """What a new subscriber gets as the retained message of `topic`."""
    async with observer(broker, topic, ident=ident) as queue:
        message = await next_on(queue, topic)
        assert message.retain
        return bytes(message.payload)


def client_tasks(tasks: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    """Tasks not belonging to an in-process amqtt broker (which starts one per broadcast)."""

    def in_amqtt(task: asyncio.Task[object]) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and "/amqtt/" in code.co_filename

    return {t for t in tasks if not in_amqtt(t)}


def collector() -> tuple[asyncio.Queue[Incoming], Callable[[Incoming], Awaitable[None]]]:
    queue: asyncio.Queue[Incoming] = asyncio.Queue()

    async def on_message(message: Incoming) -> None:
        queue.put_nowait(message)

    return queue, on_message


async def test_subscribes_receives_in_order_and_publishes(broker: Broker) -> None:
    received, on_message = collector()
    link = MqttLink(options(broker, subscriptions=(("sensors/+/state", 1),)), on_message)
    async with running(link), observer(broker, "parking/#") as seen:
        await link.wait_connected(DEADLINE)
        async with aiomqtt.Client(broker.address.host, broker.address.port, identifier="dev") as device:
            for n in range(5):
                await device.publish(f"sensors/S{n}/state", f"{n}".encode(), qos=1)
            await device.publish("cameras/c1/reads", b"not subscribed", qos=1)
        got = [await asyncio.wait_for(received.get(), DEADLINE) for _ in range(5)]
        assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
            (f"sensors/S{n}/state", f"{n}".encode(), 1, False) for n in range(5)
        ]
        link.publish("parking/gw1/events", '{"seq": 1}')
        event = await next_on(seen, "parking/gw1/events")
        assert event.payload == b'{"seq": 1}'
        assert not event.retain
        assert link.connected
    assert received.empty()
    assert await retained_value(broker, STATUS) == b"offline"


async def test_online_is_retained_and_nodelay_is_set(broker: Broker) -> None:
    link = MqttLink(options(broker), collector()[1])
    async with running(link):
        await link.wait_connected(DEADLINE)
        assert await retained_value(broker, STATUS) == b"online"
        assert link._client is not None
        sock = link._client._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_retained_state_is_republished_after_broker_restart(broker: Broker) -> None:
    link = MqttLink(options(broker), collector()[1])
    async with running(link):
        await link.wait_connected(DEADLINE)
        async with observer(broker, "parking/gw1/slots/#") as seen:
            link.publish("parking/gw1/slots/A", b"occupied", retain=True)
            link.publish("parking/gw1/slots/B", b"available", retain=True)
            await next_on(seen, "parking/gw1/slots/B")
        await broker.stop()
        await until(lambda: not link.connected)
        link.publish("parking/gw1/slots/B", b"reserved", retain=True)  # while down: the latest wins
        await broker.start()
        await until(lambda: link.reconnects == 1 and link.connected)
        assert await retained_value(broker, "parking/gw1/slots/A", "fresh-a") == b"occupied"
        assert await retained_value(broker, "parking/gw1/slots/B", "fresh-b") == b"reserved"
        assert await retained_value(broker, STATUS, "fresh-s") == b"online"
    assert link.retained == {"parking/gw1/slots/A": b"occupied", "parking/gw1/slots/B": b"reserved"}


async def test_a_retained_view_is_rendered_at_send_time_and_republished_after_broker_restart(broker: Broker) -> None:
    view = {"A": b"occupied", "B": b"available"}
    link = MqttLink(options(broker), collector()[1])
    link.retain_view("parking/gw1/slots/", view.keys, view.get)
    async with running(link):
        await link.wait_connected(DEADLINE)
        assert await retained_value(broker, "parking/gw1/slots/A") == b"occupied"  # queued at connect
        await broker.stop()
        await until(lambda: not link.connected)
        view["B"] = b"reserved"  # while down: the owner's state changes, the link keeps no copy of it
        link.publish_view("parking/gw1/slots/B")
        await broker.start()
        await until(lambda: link.reconnects == 1 and link.connected)
        assert await retained_value(broker, "parking/gw1/slots/A", "fresh-a") == b"occupied"
        assert await retained_value(broker, "parking/gw1/slots/B", "fresh-b") == b"reserved"
        async with observer(broker, "parking/gw1/slots/A", ident="watch-a") as seen:
            await next_on(seen, "parking/gw1/slots/A")  # its retained copy
            del view["A"]  # gone from the view: its retained copy is cleared (an empty payload)
            link.publish_view("parking/gw1/slots/A")
            assert bytes((await next_on(seen, "parking/gw1/slots/A")).payload) == b""
    assert link.retained == {}


async def test_publish_while_disconnected_is_delivered_after_reconnect(broker: Broker) -> None:
    gate = Gate()
    link = MqttLink(options(broker), collector()[1], on_connect=gate)
    async with running(link):
        await link.wait_connected(DEADLINE)
        await broker.stop()
        await until(lambda: not link.connected)
        for n in range(20):
            link.publish("parking/gw1/events", f"e{n}")
        gate.opened.clear()  # the link must not send before the observer below is subscribed
        await broker.start()
        await until(lambda: gate.connects == 2)
        async with observer(broker, "parking/gw1/events") as seen:
            gate.opened.set()
            got = [(await next_on(seen, "parking/gw1/events")).payload for _ in range(20)]
        assert got == [f"e{n}".encode() for n in range(20)]
        assert link.dropped == 0


class Relay:
    """A TCP relay in front of a broker that can swallow what clients send and cut every connection."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.holding = False
        self.held = b""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        self.holding = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if upstream and self.holding:
                        self.held += data
                        continue
                    dst.write(data)
                    await dst.drain()

        pumps = [
            asyncio.create_task(pump(reader, up_writer, True)),
            asyncio.create_task(pump(up_reader, writer, False)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        writer.transport.abort()
        up_writer.transport.abort()
        await asyncio.wait(pumps)


async def test_unacknowledged_messages_are_resent_after_the_connection_breaks(broker: Broker) -> None:
    async with Relay(broker.address) as relay, observer(broker, "parking/gw1/events") as seen:
        link = MqttLink(options(broker, host="127.0.0.1", port=relay.port), collector()[1])
        async with running(link):
            await link.wait_connected(DEADLINE)
            relay.holding = True  # the broker never sees these, so no PUBACK comes back
            for n in range(10):
                link.publish("parking/gw1/events", f"e{n}")
            await until(lambda: b"e9" in relay.held)
            relay.cut()
            got = [(await next_on(seen, "parking/gw1/events")).payload for _ in range(10)]
            assert got == [f"e{n}".encode() for n in range(10)]
            assert link.reconnects == 1


async def test_last_will_on_abnormal_disconnect_and_offline_on_cancel(broker: Broker) -> None:
    baseline = asyncio.all_tasks()
    link = MqttLink(options(broker), collector()[1])
    async with observer(broker, STATUS) as status:
        async with running(link) as task:
            await link.wait_connected(DEADLINE)
            assert (await next_on(status, STATUS)).payload == b"online"
            assert link._client is not None
            sock = link._client._client.socket()
            assert isinstance(sock, socket.socket)
            # The TCP connection dies under the client: no DISCONNECT reaches the broker.
            sock.shutdown(socket.SHUT_RDWR)
            will = await next_on(status, STATUS)
            assert will.payload == b"offline"
            assert (await next_on(status, STATUS)).payload == b"online"
            await until(lambda: link.reconnects == 1)
        assert task.cancelled()
        assert (await next_on(status, STATUS)).payload == b"offline"
        assert not link.connected
    await until(lambda: not client_tasks(asyncio.all_tasks() - baseline))


async def test_a_cancellation_swallowed_under_the_link_still_stops_it(broker: Broker) -> None:
    # Python 3.11's asyncio.wait_for (aiomqtt waits for every PUBACK and SUBACK with it) returns the result and
    # drops the cancellation when both come in the same loop iteration: the link cancelled while its `online`
    # was being acknowledged went on serving, and the test above hung in `await task` for 300 s (twice in CI).
    # Here a hook swallows the cancellation the same way.
    swallowed = asyncio.Event()

    async def on_connect() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.set()

    link = MqttLink(options(broker), collector()[1], on_connect=on_connect)
    task = asyncio.create_task(link.run())
    await until(lambda: link._client is not None and link._client._client.is_connected())
    await asyncio.sleep(0.05)
    task.cancel()
    # asyncio.wait, not `await task`: a second cancellation (of the waiter, passed on to the task) would hide it.
    await asyncio.wait({task}, timeout=DEADLINE)
    assert swallowed.is_set()
    if not task.done():
        task.cancel()  # once more, so the test ends; the assertion below says what went wrong
        await asyncio.wait({task}, timeout=DEADLINE)
        pytest.fail("the link ran on after its cancellation was swallowed")
    assert task.cancelled() and not link.connected


async def test_queue_bound_drops_oldest_non_retained(broker: Broker) -> None:
    gate = Gate()
    gate.opened.clear()
    link = MqttLink(options(broker, queue_max=5), collector()[1], on_connect=gate)
    link.publish("parking/gw1/slots/A", b"v1", retain=True)
    for n in range(7):
        link.publish("parking/gw1/events", f"e{n}")
    link.publish("parking/gw1/slots/A", b"v2", retain=True)  # coalesced with the queued v1
    assert link.dropped == 3
    async with running(link):
        await until(lambda: gate.connects == 1)
        async with observer(broker, "parking/gw1/#") as seen:
            gate.opened.set()
            events = [(await next_on(seen, "parking/gw1/events")).payload for _ in range(4)]
            assert events == [b"e3", b"e4", b"e5", b"e6"]
            await link.wait_connected(DEADLINE)
        assert await retained_value(broker, "parking/gw1/slots/A") == b"v2"
    assert link.dropped == 3


def test_retained_messages_are_never_dropped() -> None:
    link = MqttLink(LinkOptions("127.0.0.1", 1, "c", STATUS, queue_max=2), collector()[1])
    for n in range(4):
        link.publish(f"parking/gw1/slots/{n}", b"x", retain=True)
    link.publish("parking/gw1/events", b"e")
    assert link.dropped == 1
    assert link.queue_depth == 4
    assert sorted(link.retained) == [f"parking/gw1/slots/{n}" for n in range(4)]


async def test_a_failing_on_message_does_not_stop_the_link(broker: Broker) -> None:
    received: list[bytes] = []

    async def on_message(message: Incoming) -> None:
        if message.payload == b"boom":
            raise ValueError("handler bug")
        received.append(message.payload)

    link = MqttLink(options(broker, subscriptions=(("in/#", 1),)), on_message)
    async with running(link):
        await link.wait_connected(DEADLINE)
        async with aiomqtt.Client(broker.address.host, broker.address.port, identifier="dev") as device:
            for payload in (b"one", b"boom", b"two"):
                await device.publish("in/x", payload, qos=1)
        await until(lambda: len(received) == 2)
        assert received == [b"one", b"two"]
        assert link.reconnects == 0


async def test_mqtt5_response_topic_and_correlation_data(mosquitto: MosquittoProcess) -> None:
    broker = _Mosquitto(mosquitto)
    received, on_message = collector()
    link = MqttLink(options(broker, protocol=5, subscriptions=(("parking/gw1/request/#", 1),)), on_message)
    async with running(link):
        await link.wait_connected(DEADLINE)
        async with aiomqtt.Client(
            broker.address.host,
            broker.address.port,
            identifier="operator",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as operator:
            await operator.subscribe("replies/op", qos=1)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = "replies/op"
            props.CorrelationData = b"\x01\x02"
            await operator.publish("parking/gw1/request/availability", b"{}", qos=1, properties=props)
            request = await asyncio.wait_for(received.get(), DEADLINE)
            assert (request.response_topic, request.correlation_data) == ("replies/op", b"\x01\x02")
            assert request.response_topic is not None
            link.publish(
                request.response_topic,
                b'{"status": "ok"}',
                response_topic=None,
                correlation_data=request.correlation_data,
            )
            async with asyncio.timeout(DEADLINE):
                reply = await anext(aiter(operator.messages))
            assert reply.payload == b'{"status": "ok"}'
            assert getattr(reply.properties, "CorrelationData", None) == b"\x01\x02"


async def test_shutdown_sends_what_is_queued_before_offline(broker: Broker) -> None:
    link = MqttLink(options(broker), collector()[1])
    async with observer(broker, "parking/gw1/#") as seen:
        async with running(link):
            await link.wait_connected(DEADLINE)
            for n in range(500):  # far more than one window: most of it is still queued when the link stops
                link.publish("parking/gw1/events", f"e{n}", droppable=False)
        got: list[bytes] = []
        async with asyncio.timeout(DEADLINE):
            while not got or got[-1] != b"offline":
                message = await seen.get()
                if message.topic.value in ("parking/gw1/events", STATUS):
                    got.append(bytes(message.payload))
    assert got[0] == b"online"
    assert got[1:] == [f"e{n}".encode() for n in range(500)] + [b"offline"]


async def test_puback_does_not_make_paho_walk_its_in_flight_messages(
    mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The windows are the link's and the session hook's own: paho sends at once and, on a PUBACK, does not scan
    every unacknowledged message for a queued one (O(window) per PUBACK, the drain's largest cost)."""
    scans = 0
    original = paho.Client._update_inflight

    def counting(self: paho.Client) -> MQTTErrorCode:
        nonlocal scans
        scans += 1
        return original(self)

    monkeypatch.setattr(paho.Client, "_update_inflight", counting)
    window = 256
    codes: list[int] = []

    async def session(outlet: Outlet) -> None:
        inflight: deque[asyncio.Future[int]] = deque()
        for n in range(3 * window):
            if len(inflight) >= window:
                codes.append(await inflight.popleft())
            inflight.append(outlet.publish("parking/gw1/events", f"e{n}".encode()))
        codes.extend([await f for f in inflight])

    broker = _Mosquitto(mosquitto)
    link = MqttLink(options(broker, extra_inflight=window), collector()[1], on_session=session)
    async with observer(broker, "parking/gw1/events") as seen, running(link):
        got = [bytes((await asyncio.wait_for(seen.get(), DEADLINE)).payload) for _ in range(3 * window)]
        await until(lambda: len(codes) == 3 * window)
    assert got == [f"e{n}".encode() for n in range(3 * window)]
    assert codes == [0] * (3 * window)
    assert scans == 0
