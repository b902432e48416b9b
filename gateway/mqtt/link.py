"""One task owns one MQTT connection: reconnects, buffers what it is given, re-publishes retained state.

``MqttLink.run`` is the connection's only owner (aiomqtt 2.x). Everything else talks to it through
``publish`` (never blocks, never fails on a disconnect), the ``on_message`` callback (awaited in
arrival order; it must hand work off quickly) and the ``on_session`` hook: a coroutine run beside the
link's own traffic for the life of each connection, given an ``Outlet`` whose QoS 1 publishes resolve on
their PUBACK (the outbox forwarder's way to know what the broker really has).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiomqtt
import paho.mqtt.client as paho
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from structlog.typing import FilteringBoundLogger

from gateway.mqtt import paho_speed
from gateway.mqtt.reconnect import Endpoint, Reconnect
from gateway.mqtt.tls import TlsOptions, client_context

__all__ = ["Gate", "Incoming", "LinkOptions", "MqttLink", "Outlet"]

paho_speed.install()  # every MQTT 5 PUBLISH in and PUBACK back builds a paho Properties

# QoS>0 publishes in flight per connection: enough to fill a WAN round trip, small enough that the
# messages to re-send after a broken connection stay few.
_YIELD_EVERY = 32
_WINDOW = 64
# paho and aiomqtt (unlike asyncio transports) leave Nagle on: 88 ms instead of 0.4 ms per round trip.
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_GOODBYE_TIMEOUT = 2.0
# On shutdown, what is queued (the last commit's replies and events) may take this long before `offline`.
_FLUSH_S = 2.0
_SUBACK_FAILURE = 0x80
# CONNACK refusing the protocol: MQTT 5 "unsupported protocol version", MQTT 3.1.1 "unacceptable protocol version".
_REFUSED_VERSION = (0x84, 0x01)


@dataclass(frozen=True, slots=True)
class LinkOptions:
    host: str
    port: int
    client_id: str
    status_topic: str
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None  # None: plain TCP; otherwise always verified (gateway.mqtt.tls)
    keepalive: int = 30
    timeout: float = 10.0  # for connecting, and for each subscribe and publish of the link's own
    subscriptions: tuple[tuple[str, int], ...] = ()
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    queue_max: int = 10000
    # "auto": 5, and 3.1.1 from the first refusal of 5 on (NATS and older RabbitMQ speak 3.1.1 only).
    protocol: Literal[3, 5, "auto"] = 3
    # Further nodes of the same broker (a cluster), tried after host:port in turn; one session across them.
    more_hosts: tuple[Endpoint, ...] = ()
    # A session the broker keeps across connections (clean session false; MQTT 5: clean start false and
    # session_expiry seconds): subscriptions hold, and QoS 1 messages wait for us while we are away.
    persistent: bool = False
    session_expiry: int = 86400
    # QoS 1 publishes the on_session hook may have in flight besides the link's own window.
    extra_inflight: int = 0


class Gate(Protocol):
    """What `online` waits for besides this connection (the input connection's subscriptions)."""

    def is_set(self) -> bool: ...
    async def wait_set(self) -> None: ...
    async def wait_clear(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    # None marks a retained topic: it is sent with its value in MqttLink.retained at send time, so
    # repeated updates while queued coalesce into one message carrying the latest state.
    payload: bytes | None
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    droppable: bool = True


class _Client(aiomqtt.Client):
    """aiomqtt's client, plus publishes answered by their PUBACK's reason code (see Outlet)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acks: dict[int, asyncio.Future[int]] = {}

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        fut = self.acks.pop(mid, None)
        if fut is None:
            super()._on_publish(client, userdata, mid, reason_code, properties)
        elif not fut.done():
            fut.set_result(reason_code.value)


class Outlet:
    """QoS 1 publishes on one live connection; each future resolves with its PUBACK's reason code.

    0 (3.1.1 has no other) or below 0x80 means the broker took the message; 0x80 and above that it refused
    it (MQTT 5: not authorised, quota exceeded, ...). A future never resolves without a PUBACK: when the
    connection ends, the hook that holds the outlet is cancelled. Unlike aiomqtt's publish() this costs no
    task per message and keeps the reason code, which aiomqtt drops.
    """

    def __init__(self, client: _Client, protocol: Literal[3, 5]) -> None:
        self._client = client
        self.protocol = protocol

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        info = self._client._client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():  # acknowledged before publish() returned (a very fast broker, same thread)
            fut.set_result(0)
        else:
            self._client.acks[info.mid] = fut
        return fut


class MqttLink:
    """Supervises one broker connection; see the module docstring."""

    def __init__(
        self,
        options: LinkOptions,
        on_message: Callable[[Incoming], Awaitable[None]],
        on_connect: Callable[[], Awaitable[None]] | None = None,
        log: FilteringBoundLogger | None = None,
        *,
        name: str = "mqtt",
        online_when: Gate | None = None,
        on_session: Callable[[Outlet], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.options = options
        self._online_when = online_when
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_session = on_session
        self._nodes = Reconnect(
            ((options.host, options.port), *options.more_hosts),
            initial=options.backoff_initial,
            maximum=options.backoff_max,
        )
        self.protocol: Literal[3, 5] = 3 if options.protocol == 3 else 5
        self._log: FilteringBoundLogger = (log or structlog.get_logger("gateway.mqtt")).bind(link=options.client_id)
        self.connected = False
        self.reconnects = 0
        self.dropped = 0
        self.retained: dict[str, bytes] = {}
        self._views: list[tuple[str, Callable[[], Iterable[str]], Callable[[str], bytes | None]]] = []
        self._queue: deque[_Outgoing] = deque()
        self._queued_retained: set[str] = set()
        self._inflight: dict[int, _Outgoing] = {}  # by paho's message id, in send order
        self._drop_warned = False
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._up = asyncio.Event()
        self._client: _Client | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._inflight)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        droppable: bool = True,
    ) -> None:
        """Queue a message; a retained one also becomes the topic's state re-published on reconnect.

        When the queue is full the oldest droppable message goes; `droppable=False` (replies) never does.
        """
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if retain:
            if data:
                self.retained[topic] = data
            else:
                self.retained.pop(topic, None)  # an empty retained message clears the broker's copy
            self._queue_retained(topic, qos)
            return
        self._queue.append(_Outgoing(topic, data, qos, False, response_topic, correlation_data, droppable))
        if len(self._queue) > self.options.queue_max:
            self._drop_oldest()
        self._wakeup.set()

    def retain_view(
        self, prefix: str, keys: Callable[[], Iterable[str]], render: Callable[[str], bytes | None]
    ) -> None:
        """Retained topics `prefix + key`, one per key of `keys()`, whose payloads `render(key)` makes at send time.

        For state the owner keeps anyway (a slot view of 10,000 slots): the link holds no second copy of it as
        bytes and topics, and still re-publishes all of it after each reconnect. `render` returning None clears
        the topic.
        """
        self._views.append((prefix, keys, render))

    def publish_view(self, topic: str, *, qos: int = 1) -> None:
        """Queue a topic of a retained view; the latest state goes when it is sent."""
        self._queue_retained(topic, qos)

    def _queue_retained(self, topic: str, qos: int) -> None:
        if topic in self._queued_retained:
            return
        self._queued_retained.add(topic)
        self._queue.append(_Outgoing(topic, None, qos, True))
        if len(self._queue) > self.options.queue_max:
            self._drop_oldest()
        self._wakeup.set()

    def _retained_payload(self, topic: str) -> bytes:
        data = self.retained.get(topic)
        if data is not None:
            return data
        for prefix, _, render in self._views:
            if topic.startswith(prefix):
                return render(topic[len(prefix) :]) or b""
        return b""

    def _drop_oldest(self) -> None:
        # Retained entries are never dropped: there is at most one per topic and each is current state.
        for index, item in enumerate(self._queue):
            if not item.retain and item.droppable:
                del self._queue[index]
                if not self._drop_warned:
                    self._drop_warned = True
                    self._log.warning("mqtt.queue_full_dropping_oldest", queue_max=self.options.queue_max)
                self.dropped += 1
                return

    async def start(self) -> None:
        """Nothing to prepare: `run` connects, once every service has started."""

    async def stop(self) -> None:
        """`run`'s cancellation already said `offline` and disconnected."""

    async def health(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "reconnects": self.reconnects,
            "dropped": self.dropped,
            "queued": self.queue_depth,
        }

    async def wait_connected(self, timeout: float) -> None:
        """Return once connected, subscribed (also `online_when`) and announced online; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            await self._up.wait()

    @property
    def endpoint(self) -> Endpoint:
        """The broker node connected to, or tried next."""
        return self._nodes.current

    async def run(self) -> None:
        """Connect, serve, reconnect: each node in turn, then capped exponential backoff with full jitter."""
        opts = self.options
        nodes = self._nodes
        ever_connected = False
        while True:
            _raise_if_cancelling()
            await asyncio.sleep(nodes.delay())
            host, port = nodes.current
            client = self._new_client(host, port)
            self._client = client
            try:
                await self._connect(client)
            except aiomqtt.MqttError as exc:
                await self._reap(client)
                self._client = None
                if self._refused_version(exc):
                    self._log.warning("mqtt.falling_back_to_3.1.1", host=host, port=port)
                    self.protocol = 3
                    continue
                self._log.warning("mqtt.connect_failed", host=host, port=port, error=str(exc))
                nodes.failed()
                continue
            if ever_connected:
                self.reconnects += 1
            ever_connected = True
            try:
                await self._serve(client)
            except aiomqtt.MqttError as exc:
                self._log.warning("mqtt.disconnected", host=host, port=port, error=str(exc))
            finally:
                self._mark_down()
                await self._disconnect(client)
                self._client = None
            nodes.failed()
            if opts.more_hosts:
                self._log.info("mqtt.next_node", host=nodes.current[0], port=nodes.current[1])

    def _refused_version(self, exc: aiomqtt.MqttError) -> bool:
        return (
            self.options.protocol == "auto"
            and self.protocol == 5
            and isinstance(exc, MqttConnectError)
            and exc.rc in _REFUSED_VERSION
        )

    def _new_client(self, host: str, port: int) -> _Client:
        # A fresh client per attempt: paho would otherwise re-send its own copies of unacknowledged
        # messages next to the ones this link (and the session hook) send again themselves.
        opts = self.options
        v5 = self.protocol == 5
        properties = None
        if v5 and opts.persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = opts.session_expiry
        inflight = _WINDOW + opts.extra_inflight
        client = _Client(
            host,
            port,
            username=opts.username,
            password=opts.password,
            identifier=opts.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(opts.status_topic, b"offline", qos=1, retain=True),
            clean_session=None if v5 else not opts.persistent,
            # Each client connects once: "first only" would mean a clean start on every attempt.
            clean_start=not opts.persistent if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=opts.keepalive,
            timeout=opts.timeout,
            tls_context=client_context(opts.tls) if opts.tls is not None else None,
            # No window inside paho: ours (_send_all's and the session hook's) bound what is in flight. With a
            # paho window every PUBACK makes paho walk all its unacknowledged messages looking for one to send
            # (`_update_inflight`, O(window)): about 33 µs per PUBACK at the forwarder's 256, the largest
            # single cost of an outbox drain (bench/drain.py --profile). The queue bound stays as paho's belt.
            max_inflight_messages=0,
            max_queued_outgoing_messages=2 * inflight,
            socket_options=(_NODELAY,),
        )
        # aiomqtt warns on every call beyond 10 pending; the window above is the real bound.
        client.pending_calls_threshold = 2 * _WINDOW + len(opts.subscriptions)
        return client

    async def _connect(self, client: aiomqtt.Client) -> None:
        await open_client(client)

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        await disconnect_client(client)

    @staticmethod
    async def _reap(client: aiomqtt.Client) -> None:
        await reap_client(client)

    def _mark_down(self) -> None:
        self.connected = False
        self._up.clear()

    async def _serve(self, client: _Client) -> None:
        opts = self.options
        try:
            if opts.subscriptions:
                granted = await client.subscribe(list(opts.subscriptions))
                _raise_if_cancelling()
                self._check_granted(granted)
            if self._online_when is None:
                await client.publish(opts.status_topic, b"online", qos=1, retain=True)
                _raise_if_cancelling()
            if self._on_connect is not None:
                await self._on_connect()
                _raise_if_cancelling()
            self._queue_retained_state()
            self.connected = True
            self._drop_warned = False
            if self._online_when is None:
                self._up.set()
            self._nodes.held()
            host, port = self._nodes.current
            self._log.info(
                "mqtt.connected", host=host, port=port, reconnects=self.reconnects, protocol=self._version_text()
            )
            await self._pump(client)
        except asyncio.CancelledError:
            self._mark_down()
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(opts.status_topic, b"offline", qos=1, retain=True, timeout=_GOODBYE_TIMEOUT)
            raise

    def _version_text(self) -> str:
        return "5" if self.protocol == 5 else "3.1.1"

    def _check_granted(self, granted: tuple[int, ...] | list[ReasonCode]) -> None:
        codes: list[int | ReasonCode] = list(granted)
        for (topic_filter, _), code in zip(self.options.subscriptions, codes, strict=False):
            failed = code.is_failure if isinstance(code, ReasonCode) else code >= _SUBACK_FAILURE
            if failed:
                self._log.error("mqtt.subscription_refused", filter=topic_filter, code=str(code))

    def _queue_retained_state(self) -> None:
        # The broker may have lost its retained messages (amqtt keeps them in memory only).
        views = (prefix + key for prefix, keys, _ in self._views for key in keys())
        missing = [topic for topic in itertools.chain(self.retained, views) if topic not in self._queued_retained]
        self._queued_retained.update(missing)
        self._queue.extendleft(_Outgoing(topic, None, 1, True) for topic in reversed(missing))
        self._wakeup.set()

    async def _pump(self, client: _Client) -> None:
        """Move messages both ways until the connection fails (MqttError) or the task is cancelled."""
        broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        incoming = asyncio.create_task(self._receive(client))
        outgoing = asyncio.create_task(self._send_all(client, broken))
        helpers = [incoming, outgoing]
        if self._online_when is not None:
            helpers.append(asyncio.create_task(self._announce(client, self._online_when, broken)))
        if self._on_session is not None:
            helpers.append(asyncio.create_task(self._session(client, broken)))
        try:
            await asyncio.wait([*helpers, broken], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            incoming.cancel()
            await self._flush(broken)
            raise
        finally:
            pending = set(helpers)
            while pending:
                for task in pending:
                    task.cancel()
                # Again after a second: a helper whose cancellation was swallowed (see _raise_if_cancelling) would
                # hold this wait, and the link, for ever.
                _, pending = await asyncio.wait(pending, timeout=1.0)
            self._requeue_inflight()
        if broken.done():
            broken.result()  # raises the MqttError of the failed publish or of the session hook
        # Only the receiver ends by itself: with MqttError when the connection drops, or with a bug.
        raise incoming.exception() or aiomqtt.MqttError("receiver stopped")

    async def _announce(self, client: aiomqtt.Client, gate: Gate, broken: asyncio.Future[None]) -> None:
        """`online` while the gate is set, `offline` while it is not (the Last Will covers this connection)."""
        status = self.options.status_topic
        try:
            while True:
                await gate.wait_set()
                await client.publish(status, b"online", qos=1, retain=True)
                self._up.set()
                self._log.info("mqtt.online")
                await gate.wait_clear()
                self._up.clear()
                await client.publish(status, b"offline", qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            if not broken.done():
                broken.set_exception(exc)

    async def _flush(self, broken: asyncio.Future[None]) -> None:
        """Shutting down: let what is queued go out, for up to _FLUSH_S, before the link says `offline`."""
        if not self._queue and not self._inflight:
            return
        self._idle.clear()
        idle = asyncio.create_task(self._idle.wait())
        waits: list[asyncio.Future[Any]] = [idle, broken]
        await asyncio.wait(waits, timeout=_FLUSH_S, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        await asyncio.wait([idle])
        if self._queue or self._inflight:
            self._log.warning("mqtt.unsent_at_shutdown", messages=self.queue_depth)

    async def _session(self, client: _Client, broken: asyncio.Future[None]) -> None:
        assert self._on_session is not None
        try:
            await self._on_session(Outlet(client, self.protocol))
        except aiomqtt.MqttError as exc:
            if not broken.done():
                broken.set_exception(exc)
            return
        except Exception as exc:
            # A bug in the hook costs this connection (and a reconnect), not the gateway.
            self._log.exception("mqtt.session_hook_failed")
            if not broken.done():
                broken.set_exception(aiomqtt.MqttError(f"session hook failed: {exc!r}"))
            return
        await asyncio.Future()  # the hook is done for this connection; the connection is not

    async def _receive(self, client: aiomqtt.Client) -> None:
        handled = 0
        async for message in client.messages:
            props = message.properties
            correlation = getattr(props, "CorrelationData", None)
            incoming = Incoming(
                topic=message.topic.value,
                payload=message.payload,
                qos=message.qos,
                retain=message.retain,
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=bytes(correlation) if correlation is not None else None,
            )
            try:
                await self._on_message(incoming)
            except Exception:
                # One bad message must not cost the connection or the messages behind it.
                self._log.exception("mqtt.on_message_failed", topic=incoming.topic)
            handled += 1
            if handled % _YIELD_EVERY == 0:
                # A queue that is never empty never suspends `async for`: let the writer and timers run.
                await asyncio.sleep(0)

    async def _send_all(self, client: aiomqtt.Client, broken: asyncio.Future[None]) -> None:
        """Hand queued messages to paho, at most _WINDOW unacknowledged; each leaves `_inflight` on its PUBACK.

        paho directly, not aiomqtt's publish(): that costs a task, an Event and a wait_for per message, about
        half of the link's CPU per message. PUBACKs arrive in paho's on_publish, wrapped here per client.
        """
        window = asyncio.Semaphore(_WINDOW)
        mqttc = client._client
        aiomqtt_on_publish = client._on_publish

        def on_publish(paho_client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
            if self._inflight.pop(mid, None) is None:
                aiomqtt_on_publish(paho_client, userdata, mid, reason, props)  # one of aiomqtt's own publishes
                return
            window.release()
            if not self._inflight and not self._queue:
                self._idle.set()

        mqttc.on_publish = on_publish
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await window.acquire()
            if not self._queue:
                window.release()
                continue
            item = self._queue.popleft()
            if item.payload is None:
                self._queued_retained.discard(item.topic)
                if not self._queued_retained:
                    # A set never shrinks: the start's 10,000 slot states would keep 512 KiB of empty table.
                    self._queued_retained = set()
            payload = item.payload if item.payload is not None else self._retained_payload(item.topic)
            info = mqttc.publish(item.topic, payload, item.qos, item.retain, self._properties(item))
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self._queue.appendleft(item)
                if not broken.done():
                    broken.set_exception(aiomqtt.MqttCodeError(info.rc, "Could not publish message"))
                return
            if item.qos == 0:
                window.release()
            else:
                self._inflight[info.mid] = item  # in send order: _requeue_inflight keeps it

    def _properties(self, item: _Outgoing) -> Properties | None:
        if self.protocol != 5 or (item.response_topic is None and item.correlation_data is None):
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if item.response_topic is not None:
            props.ResponseTopic = item.response_topic
        if item.correlation_data is not None:
            props.CorrelationData = item.correlation_data
        return props

    def _requeue_inflight(self) -> None:
        """Unacknowledged messages go back to the front, in their order (QoS 1: at least once)."""
        back: list[_Outgoing] = []
        for item in self._inflight.values():
            if item.payload is None:
                if item.topic in self._queued_retained:
                    continue  # a newer update of the topic is already queued
                self._queued_retained.add(item.topic)
            back.append(item)
        self._inflight.clear()
        self._queue.extendleft(reversed(back))


def _raise_if_cancelling() -> None:
    """Raise the cancellation of this task if an await swallowed it. Python 3.11's asyncio.wait_for, which aiomqtt
    waits for every acknowledgement with, returns the result and drops a cancellation that comes in the same loop
    iteration as the result: the link then served on after its task was cancelled (a stop that never ends)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def open_client(client: aiomqtt.Client) -> None:
    """Connect; paho connects in an executor thread that cancellation cannot stop, so a cancelled attempt is
    let finish and closed: no socket or aiomqtt helper task outlives it."""
    attempt = asyncio.ensure_future(client.__aenter__())
    try:
        await asyncio.shield(attempt)
    except asyncio.CancelledError:
        with contextlib.suppress(aiomqtt.MqttError):
            await attempt
            await disconnect_client(client)
        raise


async def disconnect_client(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aexit__(None, None, None)
    await reap_client(client)


async def reap_client(client: aiomqtt.Client) -> None:
    # aiomqtt only schedules the cancellation of its keepalive task; wait for it to be gone.
    misc = client._misc_task
    if misc is not None and not misc.done():
        misc.cancel()
        await asyncio.wait([misc])
    # The owner has logged why the connection ended; mark aiomqtt's futures as seen, or asyncio reports
    # "Future exception was never retrieved" when they are collected.
    for name in ("_connected", "_disconnected"):
        fut = getattr(client, name, None)
        if isinstance(fut, asyncio.Future) and fut.done() and not fut.cancelled():
            fut.exception()
