"""The gateway's input connection to the local broker: device messages and requests in, PUBACKs out.

``InboundLink.run`` owns the connection (aiomqtt 2.x over paho). It is apart from the output connection
(``link.MqttLink``: publishes, ``R/status``, the Last Will) so that pausing its reads never holds back the
PUBACKs of the gateway's own publishes.

- **Acknowledgement after commit** (contract §3 v1.2). With ``persistent`` (an external broker) the session
  outlives the connection (3.1.1: clean session false; 5: clean start false and a session expiry) and a QoS 1
  message is acknowledged only once its handler is done with it: at once when the handler returns None,
  otherwise when the future it returned resolves True (what the message caused is committed). PUBACKs go out
  in the order the messages arrived (MQTT-4.6.0-2), so one waiting for its commit holds back those behind it.
  A future that resolves False (not committed) is never acknowledged: the link reconnects and the broker
  delivers it again. Without ``persistent`` (the embedded broker) paho acknowledges on receipt.
- **Bounded memory whatever the broker does.** Received and not yet acknowledged messages are counted; at
  ``pause_at`` the link stops reading the socket until they are down to ``resume_at``, so a burst waits in TCP
  and in the broker (Mosquitto 2.0 runs far past the Receive Maximum the link asks for once PUBACKs flow).
- **Priority topics** (``priority``: the decision topics, a car waiting at a barrier): their messages are handed
  to the handler before any other waiting message; every message keeps its place in the PUBACK order from the
  moment it arrives, so the order of acknowledgements is still that of arrival.
- **Subscriptions**: ``subscribed`` is set only once the broker granted every filter; a refused one is logged
  as an error naming it and asked for again with backoff, while the granted ones deliver.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from structlog.typing import FilteringBoundLogger

from gateway.mqtt.link import Incoming, disconnect_client, open_client, reap_client
from gateway.mqtt.tls import TlsOptions, client_context
from gateway.mqtt.topics import match

__all__ = ["Handled", "InboundLink", "InboundOptions", "Level"]

# What a handler returns for one message: None once it is done with it, or a future that resolves True once
# what the message caused is committed (False: it was not, and the message must come again).
Handled = asyncio.Future[bool] | None

_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_YIELD_EVERY = 8
_SUBACK_FAILURE = 0x80
# A session queue drained at connect can put many messages ahead of the SUBACK: wait for it patiently.
_SUBSCRIBE_TIMEOUT = 60.0
_STOP_GRACE_S = 2.0
_PUBACK = 0x40
_PUBACK_PACKET = struct.Struct("!BBH")
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class InboundOptions:
    host: str
    port: int
    client_id: str
    subscriptions: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None  # None: plain TCP; otherwise always verified (gateway.mqtt.tls)
    keepalive: int = 30
    protocol: Literal[3, 5] = 3
    persistent: bool = False
    session_expiry: int = 86_400  # seconds the broker keeps the session (MQTT 5); the contract asks >= a day
    receive_maximum: int = 64  # MQTT 5: unacknowledged messages the broker may send us at once
    pause_at: int = 512  # received, not yet acknowledged: stop reading the socket here ...
    resume_at: int = 128  # ... and read again here
    # Topic filters whose messages are handled before any other waiting message (a car waits at a barrier);
    # their PUBACKs still go out in arrival order.
    priority: tuple[str, ...] = ()
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class Level:
    """A state one side raises and lowers and the other can wait on in either direction."""

    def __init__(self) -> None:
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()

    def is_set(self) -> bool:
        return self._up.is_set()

    def set(self) -> None:
        self._down.clear()
        self._up.set()

    def clear(self) -> None:
        self._up.clear()
        self._down.set()

    async def wait_set(self) -> None:
        await self._up.wait()

    async def wait_clear(self) -> None:
        await self._down.wait()


class _Acks:
    """One connection's received messages in arrival order; PUBACKs leave from the front, in that order.

    The PUBACKs released in one pass of the event loop go out as one write (paho would make a packet, a
    queue entry and a send() of each).
    """

    __slots__ = ("_client", "_empty", "_manual", "_order", "_scheduled", "_unsent", "stuck")

    def __init__(self, client: paho.Client, *, manual: bool) -> None:
        self._client = client
        self._manual = manual
        self._unsent: list[int] = []
        self._scheduled = False
        # [mid, state]: mid 0 for QoS 0 (nothing to acknowledge, still counted); state None while the handler
        # works, True when done, False when it was not committed.
        self._order: deque[list[Any]] = deque()
        self.stuck: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._empty: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._order)

    def add(self, mid: int) -> list[Any]:
        entry = [mid, None]
        self._order.append(entry)
        return entry

    def settle(self, entry: list[Any], done: bool) -> None:
        entry[1] = done
        order = self._order
        if not order or order[0] is not entry:
            return  # an earlier message still waits; this one's PUBACK follows it
        unsent = self._unsent
        while order and order[0][1] is True:
            mid = order.popleft()[0]
            if mid and self._manual:
                unsent.append(mid)
        if unsent and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)
        if order and order[0][1] is False and not self.stuck.done():
            self.stuck.set_result(None)
        if not order and self._empty is not None and not self._empty.done():
            self._empty.set_result(None)

    def _send(self) -> None:
        self._scheduled = False
        mids, self._unsent = self._unsent, []
        # PUBACK: type 4, remaining length 2, the packet id; the same bytes in 3.1.1 and in 5 (reason 0 omitted).
        self._client._packet_queue(_PUBACK, b"".join(_PUBACK_PACKET.pack(_PUBACK, 2, mid) for mid in mids), 0, 0)

    def empty(self) -> asyncio.Future[None]:
        """Resolves once every message received so far is acknowledged."""
        if self._empty is None or self._empty.done():
            self._empty = asyncio.get_running_loop().create_future()
            if not self._order:
                self._empty.set_result(None)
        return self._empty


def _matcher(filters: tuple[str, ...]) -> Callable[[str], bool] | None:
    """A test of a topic against `filters`, cheap for the topics that match none: every sensor message takes it.

    paho's topic_matches_sub builds a matcher per call: 10 us, 5 % of the receive loop at 2,000 msgs/s."""
    if not filters:
        return None
    heads = tuple(f.split("/", 1)[0] for f in filters)
    prefixes = None if any(h in ("+", "#") for h in heads) else heads

    def matches(topic: str) -> bool:
        if prefixes is not None and not topic.startswith(prefixes):
            return False
        return any(match(f, topic) is not None for f in filters)

    return matches


class _Client(aiomqtt.Client):
    """aiomqtt's client with its own reading: into a plain deque, many packets per wake-up, and pausable.

    aiomqtt reads one packet per event-loop wake-up into an unbounded queue and builds a task and a Topic per
    message; reading here stops at `pause` and resumes at `resume` (the socket leaves the selector meanwhile).
    Three of paho's per-packet steps are replaced on this client only: its recv() calls are served from one
    larger read, a received PUBLISH goes straight to the deque (paho would match it against per-topic callbacks
    under two locks), and its debug lines are not formatted (the gateway shows libraries' warnings only).
    """

    def __init__(
        self,
        *args: Any,
        arrived: Callable[[], None],
        manual_ack: bool,
        priority: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._client.manual_ack_set(manual_ack)
        # Every message has its place in the PUBACK order from the moment it arrives, whichever queue it waits in.
        self.acks = _Acks(self._client, manual=manual_ack)
        self.inbox: deque[tuple[paho.MQTTMessage, list[Any]]] = deque()
        self.urgent: deque[tuple[paho.MQTTMessage, list[Any]]] = deque()  # `priority` topics: handled first
        self._priority = _matcher(priority)
        self._arrived = arrived
        self._fd: int | None = None
        self.reading = False
        # paho reads a packet in three recv() calls (type, length, rest); serve them from one larger read.
        self._chunk = b""
        self._at = 0
        mqttc = self._client
        mqttc._sock_recv = self._recv  # type: ignore[method-assign,assignment]
        mqttc._handle_on_message = self._deliver  # type: ignore[method-assign]
        mqttc._easy_log = self._log  # type: ignore[method-assign]

    def _recv(self, size: int) -> bytes:
        if self._at >= len(self._chunk):
            self._chunk = paho.Client._sock_recv(self._client, _READ_CHUNK)
            self._at = 0
            if not self._chunk:
                return self._chunk  # end of stream
        data = self._chunk[self._at : self._at + size]
        self._at += len(data)
        return data

    def _buffered(self) -> bool:
        if self._at < len(self._chunk):
            return True
        sock = self._client._sock
        return sock is not None and getattr(sock, "pending", lambda: 0)() > 0  # TLS: decrypted already

    def _deliver(self, message: paho.MQTTMessage) -> None:
        item = (message, self.acks.add(message.mid if message.qos else 0))
        if self._priority is not None and self._priority(message.topic):
            self.urgent.append(item)
        else:
            self.inbox.append(item)
        self._arrived()

    def drop_unhandled(self) -> None:
        """Shutting down: what waits here is never handled, so never acknowledged (the broker sends it again)."""
        items = [*self.urgent, *self.inbox]
        self.urgent.clear()
        self.inbox.clear()
        for _, entry in items:
            self.acks.settle(entry, False)

    def _log(self, level: int, fmt: str, *args: Any) -> None:
        if level != paho.MQTT_LOG_DEBUG:
            paho.Client._easy_log(self._client, level, fmt, *args)  # type: ignore[arg-type]

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()

        def start() -> None:
            self._fd = fd
            self._misc_task = self._loop.create_task(self._misc_loop())
            self.reading = True
            self._loop.add_reader(fd, self._readable)

        # paho calls this from the executor thread that connects (aiomqtt's __aenter__).
        self._loop.call_soon_threadsafe(start)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._fd = None
        self.reading = False
        super()._on_socket_close(client, userdata, sock)

    def _readable(self) -> None:
        mqttc = self._client
        try:
            while self.reading:
                rc = mqttc._packet_read()
                if rc == paho.MQTT_ERR_AGAIN:
                    if self._buffered():
                        self._loop.call_soon(self._readable)  # bytes the socket will not wake us up for
                    return
                if rc != paho.MQTT_ERR_SUCCESS:
                    mqttc._loop_rc_handle(rc)
                    return
        except Exception as exc:
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)

    def pause(self) -> None:
        if self.reading and self._fd is not None:
            self.reading = False
            self._loop.remove_reader(self._fd)

    def resume(self) -> None:
        if not self.reading and self._fd is not None:
            self.reading = True
            self._loop.add_reader(self._fd, self._readable)
            self._loop.call_soon(self._readable)  # what arrived (or was decrypted) while paused


class InboundLink:
    """Supervises the input connection; see the module docstring. A service (start, run, stop, health)."""

    def __init__(
        self,
        options: InboundOptions,
        on_message: Callable[[Incoming], Awaitable[Handled]],
        log: FilteringBoundLogger | None = None,
        *,
        name: str = "mqtt-in",
    ) -> None:
        self.name = name
        self.options = options
        self._on_message = on_message
        self._log: FilteringBoundLogger = (log or structlog.get_logger("gateway.mqtt")).bind(link=options.client_id)
        self.subscribed = Level()
        self.connected = False
        self.reconnects = 0
        self.received = 0
        self.pauses = 0
        self.refused: set[str] = set()
        self._client: _Client | None = None
        self._acks: _Acks | None = None
        self._wakeup = asyncio.Event()

    @property
    def backlog(self) -> int:
        """Messages received on this connection and not yet acknowledged (or, QoS 0, not yet handled)."""
        acks = self._acks
        return len(acks) if acks is not None else 0

    async def start(self) -> None:
        """Nothing to prepare: `run` connects, once every service has started."""

    async def stop(self) -> None:
        """`run`'s cancellation already acknowledged what was done and disconnected."""

    async def health(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "subscribed": self.subscribed.is_set(),
            "reconnects": self.reconnects,
            "received": self.received,
            "backlog": self.backlog,
            "read_pauses": self.pauses,
        }

    async def run(self) -> None:
        """Connect, serve, reconnect with capped exponential backoff and full jitter; until cancelled."""
        opts = self.options
        failures = 0
        ever_connected = False
        while True:
            client = self._new_client()
            try:
                await open_client(client)
            except aiomqtt.MqttError as exc:
                self._log.warning("mqtt.connect_failed", host=opts.host, port=opts.port, error=str(exc))
                await reap_client(client)
            else:
                if ever_connected:
                    self.reconnects += 1
                ever_connected = True
                failures = 0
                try:
                    await self._serve(client)
                except aiomqtt.MqttError as exc:
                    self._log.warning("mqtt.disconnected", error=str(exc))
                finally:
                    self._down()
                    await disconnect_client(client)
            ceiling = min(opts.backoff_max, opts.backoff_initial * 2 ** min(failures, 32))
            failures += 1
            await asyncio.sleep(random.uniform(0, ceiling))

    def _new_client(self) -> _Client:
        opts = self.options
        v5 = opts.protocol == 5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = opts.receive_maximum
            if opts.persistent:
                properties.SessionExpiryInterval = opts.session_expiry
        client = _Client(
            opts.host,
            opts.port,
            arrived=self._arrived,
            manual_ack=opts.persistent,
            priority=opts.priority,
            username=opts.username,
            password=opts.password,
            identifier=opts.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else not opts.persistent,
            # One client per connection attempt: "clean start on the first connect only" would mean every time.
            clean_start=not opts.persistent if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=opts.keepalive,
            tls_context=client_context(opts.tls) if opts.tls is not None else None,
            socket_options=(_NODELAY,),
        )
        return client

    def _arrived(self) -> None:
        """paho handed over a message (inside the socket's read callback)."""
        self.received += 1
        self._wakeup.set()
        client = self._client
        if client is not None and client.reading and self.backlog >= self.options.pause_at:
            client.pause()
            self.pauses += 1

    def _down(self) -> None:
        self.connected = False
        self.subscribed.clear()
        self._client = None
        self._acks = None

    async def _serve(self, client: _Client) -> None:
        acks = client.acks
        self._client, self._acks = client, acks
        self.connected = True
        self._log.info("mqtt.connected", host=self.options.host, port=self.options.port, reconnects=self.reconnects)
        consumer = asyncio.create_task(self._consume(client, acks))
        subscriber = asyncio.create_task(self._subscribe(client))
        helpers = [consumer, subscriber]
        try:
            waits: list[asyncio.Future[Any]] = [consumer, client._disconnected, acks.stuck]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self._goodbye(client, acks, helpers)
            raise
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.wait(helpers)
        if acks.stuck.done():
            raise aiomqtt.MqttError("a message was not committed: reconnecting so that the broker sends it again")
        if client._disconnected.done():
            exc = client._disconnected.exception()
            raise aiomqtt.MqttError(f"connection lost: {exc}" if exc else "disconnected")
        raise consumer.exception() or aiomqtt.MqttError("receiver stopped")

    async def _goodbye(self, client: _Client, acks: _Acks, helpers: list[asyncio.Task[Any]]) -> None:
        """Shutting down: read nothing more, and let what is being committed be acknowledged (a moment)."""
        client.pause()
        helpers[0].cancel()  # the consumer: what it has not handled stays unacknowledged, the broker sends it again
        client.drop_unhandled()
        waits: list[asyncio.Future[Any]] = [acks.empty(), acks.stuck, client._disconnected]
        await asyncio.wait(waits, timeout=_STOP_GRACE_S, return_when=asyncio.FIRST_COMPLETED)

    async def _consume(self, client: _Client, acks: _Acks) -> None:
        inbox, urgent = client.inbox, client.urgent
        opts = self.options
        handled = 0
        while True:
            if urgent:
                message, entry = urgent.popleft()
            elif inbox:
                message, entry = inbox.popleft()
            else:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            result: Handled = None
            incoming = _incoming(message)
            if incoming is None:
                self._log.warning("mqtt.topic_not_utf8", topic=repr(message._topic[:100]))
            else:
                try:
                    result = await self._on_message(incoming)
                except asyncio.CancelledError:
                    acks.settle(entry, False)  # never acknowledged: the broker sends it again
                    raise
                except Exception:
                    # One bad message must not cost the connection or the messages behind it.
                    self._log.exception("mqtt.on_message_failed", topic=incoming.topic)
            if result is None:
                acks.settle(entry, True)
            else:
                result.add_done_callback(functools.partial(self._settled, acks, entry))
            if not client.reading and self.backlog <= opts.resume_at:
                client.resume()
            handled += 1
            if handled % _YIELD_EVERY == 0:
                # An inbox that never empties never suspends this loop: let the writer and the timers run.
                await asyncio.sleep(0)

    def _settled(self, acks: _Acks, entry: list[Any], fut: asyncio.Future[bool]) -> None:
        done = not fut.cancelled() and fut.exception() is None and fut.result()
        if acks is not self._acks:
            return  # that connection is gone: the broker sends the message again on the next one
        acks.settle(entry, done)
        client = self._client
        if client is not None and not client.reading and self.backlog <= self.options.resume_at:
            client.resume()

    async def _subscribe(self, client: _Client) -> None:
        """Ask for every filter; ask again for refused ones with backoff; `subscribed` once all are granted."""
        opts = self.options
        wanted = list(opts.subscriptions)
        failures = 0
        while wanted:
            if opts.protocol == 5:
                # Retain-as-published: a retained message shows its flag also while subscribed (contract §3).
                topics: list[Any] = [(f, SubscribeOptions(qos=q, retainAsPublished=True)) for f, q in wanted]
            else:
                topics = list(wanted)
            codes: list[int | ReasonCode] = list(await client.subscribe(topics, timeout=_SUBSCRIBE_TIMEOUT))
            refused = [(f, q) for (f, q), code in zip(wanted, codes, strict=True) if _failed(code)]
            for (topic_filter, _), code in zip(wanted, codes, strict=True):
                if _failed(code):
                    self._log.error("mqtt.subscription_refused", filter=topic_filter, code=str(code))
            self.refused = {f for f, _ in refused}
            wanted = refused
            if wanted:
                ceiling = min(opts.backoff_max, opts.backoff_initial * 2 ** min(failures, 32))
                failures += 1
                await asyncio.sleep(random.uniform(ceiling / 2, ceiling))
        self.subscribed.set()
        self._log.info("mqtt.subscribed", filters=[f for f, _ in opts.subscriptions])


def _failed(code: int | ReasonCode) -> bool:
    return code.is_failure if isinstance(code, ReasonCode) else code >= _SUBACK_FAILURE


def _incoming(message: paho.MQTTMessage) -> Incoming | None:
    try:
        topic = message._topic.decode()
    except UnicodeDecodeError:
        return None
    props = getattr(message, "properties", None)
    correlation = getattr(props, "CorrelationData", None)
    return Incoming(
        topic=topic,
        payload=bytes(message.payload),
        qos=message.qos,
        retain=bool(message.retain),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=bytes(correlation) if correlation is not None else None,
    )
