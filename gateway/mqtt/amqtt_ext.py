"""What the gateway adds to amqtt 0.12.1, written against its internals (the version is pinned in pyproject).

Imported only when the embedded broker starts: amqtt pulls in websockets, transitions and dacite.

- ``GatewayBroker``:
  - Client ids. amqtt keeps sessions by client id and, before it checks the password of a CONNECT, deletes
    (clean session) or rewrites (resume) the session under that id and takes its connection over: anyone
    could kick the gateway's own link off, or silently empty its subscriptions. Here a CONNECT is
    authenticated first, and refused (CONNACK "identifier rejected", nothing touched) when
    - its client id starts with the gateway's prefix (``<gateway.id>-``: every link of the gateway) and the
      client is not the gateway's own account;
    - a session under that id exists and belongs to another identity. A session belongs to the identity that
      created it (an account, or ANONYMOUS; see ``identity``): only that identity may resume it or take its
      connection over, so an anonymous client never takes an account's session, nor an account an
      anonymous one.
  - Messages queued for an offline session are delivered on resume only where the client may read them.
  - Retained messages: amqtt's CONNECT handling sends the connecting client the retained messages matching
    *every* subscription filter in the broker, whoever subscribed it, without an ACL check (``Broker.
    _handle_client_session``, after "Publish retained messages to a pre-existing session's subscriptions").
    Here a connecting session gets the retained messages of its own subscriptions only, each filter checked
    against the ACL again.
  - A will is published only where its client may publish (amqtt does not check it).
  - Nothing acknowledged is lost when a client leaves. amqtt acknowledges a QoS 1 publish on receipt and queues
    it for the session's message loop, which broadcasts one message per pass; on a disconnect its loop ends
    and drops what is still queued: whatever the loop was behind by, e.g. a device that subscribes to a
    retained topic, publishes and leaves in one go (the loop waits for the retained message's PUBACK).
    Here the loop broadcasts every queued message, in order, before it handles the disconnect (the will last).
  - ACL checks decide in place (``AclPlugin.allows``). amqtt asks each topic plugin in a task of its own and
    gathers them, so every check suspended its caller: its broadcast loop iterates the live subscription table
    around the check, and a session cleaned up meanwhile (amqtt's session monitor, once a second) ended that
    broadcast with "dictionary changed size during iteration" for the subscribers after it. A check that does
    not suspend leaves nothing to change the table under the loop, as before the ACL applied to everyone.
- ``AclPlugin``: the ACL of gateway.mqtt.acl, in place of amqtt's TopicAccessControlListPlugin, which lets
  everyone publish anything when the publish ACL is empty and lets a granted `a/+` subscribe to `a/#`.
- ``GatewayAccountPlugin``: the gateway's own in-process account when there is no users_file.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from typing import Any

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import format_client_message, gen_client_id

from gateway.mqtt.acl import ANONYMOUS, covers

_HOOKED = (
    "_initialize_client_session",
    "_authenticate",
    "_publish_session_retained_messages",
    "_publish_retained_messages_for_subscription",
    "_client_message_loop",
    "_handle_subscription",
    "_handle_unsubscription",
    "_handle_message_delivery",
    "_handle_disconnect",
    "_topic_filtering",
)
_missing = [name for name in _HOOKED if not callable(getattr(Broker, name, None))]
if _missing:
    # The fixes hook these; without them they would silently do nothing.
    raise ImportError(f"amqtt's Broker lacks {', '.join(_missing)}: unsupported amqtt version")


# Session.attributes key (amqtt keeps that dict for extensions): the identity that created the session.
_OWNER = "gateway.owner"


def identity(session: Session, accounts: Set[str]) -> str:
    """Who a client is: its user name when that is an account (amqtt checked its password), else ANONYMOUS."""
    return session.username if session.username in accounts else ANONYMOUS


class GatewayBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker, with client ids bound to identities and the ACL on every delivery (see the module)."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        accounts: Iterable[str] = (),
        gateway_user: str | None = None,
        gateway_prefix: str | None = None,
    ) -> None:
        super().__init__(config)
        topic_plugins = [p for p in self.plugins_manager.plugins if isinstance(p, BaseTopicPlugin)]
        if any(not isinstance(p, AclPlugin) for p in topic_plugins):
            # `_topic_filtering` asks the AclPlugins only; another topic plugin would be silently left out.
            raise ValueError("the gateway's broker takes no topic plugin but its AclPlugin")
        self._acls: list[AclPlugin] = topic_plugins
        self._accounts = frozenset(accounts) - {ANONYMOUS}
        self._gateway_user = gateway_user
        self._gateway_prefix = gateway_prefix
        self._replayed: Session | None = None

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt 0.12.1's own, with `_admit` between reading CONNECT and touching any session.
        where = format_client_message(address=remote_address, port=remote_port)
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except AMQTTError as exc:
            self.logger.warning(f"[MQTT-3.1.0-1] {where}: Can't read first packet as CONNECT: {exc}")
            raise AMQTTError(exc) from exc
        except MQTTError as exc:
            self.logger.warning(f"Invalid connection from {where}")
            await writer.close()
            raise MQTTError(exc) from exc
        except NoDataError as exc:
            self.logger.error(f"No data from {where} : {exc}")  # as amqtt; broker.py filters it as noise
            raise AMQTTError(exc) from exc

        refused = await self._admit(session)
        if refused is not None:
            code, reason = refused
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            raise MQTTError(f"{format_client_message(session=session)} refused: {reason}")

        # Nothing suspends from `_admit`'s look at the sessions to amqtt registering this session (in
        # `_handle_client_session`): no other CONNECT for this client id can come in between.
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            # As amqtt: the new CONNECT's will, keep-alive and credentials on the resumed session.
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _admit(self, session: Session) -> tuple[int, str] | None:
        """None when this CONNECT may go on, else the CONNACK return code refusing it and why."""
        if not await super()._authenticate(session, None):
            return NOT_AUTHORIZED, "bad credentials"  # amqtt's answer to them
        who = identity(session, self._accounts)
        client_id = session.client_id or ""
        if self._gateway_prefix and client_id.startswith(self._gateway_prefix) and who != self._gateway_user:
            return IDENTIFIER_REJECTED, "a client id of the gateway's own links, from another client"
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].attributes.get(_OWNER) != who:
            return IDENTIFIER_REJECTED, "the session of this client id belongs to another client"
        session.attributes[_OWNER] = who
        return None

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Decided by `_admit` before the session was looked up (one password check per CONNECT); only a
        # session created by an admitted CONNECT has an owner.
        return _OWNER in session.attributes

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # Messages queued while the session was offline, checked again against who is resuming it.
        queued = session.retained_messages
        for message in [queued.get_nowait() for _ in range(queued.qsize())]:
            if await self._topic_filtering(session, message.topic, Action.RECEIVE):
                queued.put_nowait(message)
        # amqtt calls this on CONNECT, then replays every filter of the broker (skipped below for this
        # session), then enters the session's message loop, all without an await that suspends in between.
        self._replayed = None
        await super()._publish_session_retained_messages(session)
        own = [
            (topic_filter, qos)
            for topic_filter, subscribers in list(self._subscriptions.items())
            for subscriber, qos in subscribers
            if subscriber.client_id == session.client_id
        ]
        for topic_filter, qos in own:
            if await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
                await super()._publish_retained_messages_for_subscription((topic_filter, qos), session)
        self._replayed = session

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if session is self._replayed:
            return  # the CONNECT-time replay of every filter in the broker: done above, own filters only
        await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        # amqtt 0.12.1's own, except that a disconnect is handled after every message the client sent before it
        # (amqtt handled it first, then at most one message, and dropped the queue: acknowledged messages).
        self._replayed = None
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        break  # as amqtt: a publish that breaks the protocol ends the connection
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect_waiter in done:
                    await self._deliver_queued(client_session, handler, wait_deliver)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    break
        except asyncio.CancelledError:
            self.logger.debug("Client loop cancelled")  # as amqtt: the session ends, the broker goes on
        finally:
            for waiter in (disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver):
                waiter.cancel()
            await asyncio.gather(
                disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver, return_exceptions=True
            )

    async def _deliver_queued(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> None:
        """Broadcast, in order, what the client sent before it left: amqtt acknowledged each on receipt.

        Nothing here suspends (neither does a delivery, the ACL deciding in place): the session ends as soon as
        in amqtt, so a client that reconnects at once finds it disconnected, not in a take-over.
        """
        first: list[Any] = []
        if not wait_deliver.done():
            # A wait cancelled before it took a message leaves it in the queue (asyncio.Queue.get).
            wait_deliver.cancel()
        elif not wait_deliver.cancelled() and wait_deliver.exception() is None:
            first.append(wait_deliver.result())  # taken from the queue before the rest
        queue = client_session.delivered_message_queue
        for message in [*first, *(queue.get_nowait() for _ in range(queue.qsize()))]:
            if message is None:
                continue
            delivered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            delivered.set_result(message)
            if not await self._handle_message_delivery(client_session, handler, delivered):
                return  # as amqtt: nothing after a publish that breaks the protocol

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # In place, without amqtt's task per plugin: see the module (the broadcast loop relies on it).
        return all(acl.allows(session, topic, action) for acl in self._acls)

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        # amqtt publishes (and retains) a will without asking the ACL; a will is a publish like any other.
        topic = client_session.will_topic
        if client_session.will_flag and not (
            topic and await self._topic_filtering(client_session, topic, Action.PUBLISH)
        ):
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)


class AclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Publish, subscribe and delivery checks by identity: a checked account, else ANONYMOUS."""

    @dataclass
    class Config:
        publish: dict[str, list[str]] = field(default_factory=dict)
        subscribe: dict[str, list[str]] = field(default_factory=dict)
        accounts: list[str] = field(default_factory=list)

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: AclPlugin.Config = self.config
        self._publish = config.publish
        self._subscribe = config.subscribe
        self._accounts = frozenset(config.accounts)

    def allows(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        """The check itself; it never suspends (GatewayBroker calls it in place)."""
        if session is None or not topic:
            return False
        who = identity(session, self._accounts)
        # Delivery (RECEIVE) is reading: the subscribe rules decide it too.
        granted = self._publish if action == Action.PUBLISH else self._subscribe
        return covers(granted.get(who, ()), topic)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        # amqtt's plugin interface (it refuses a topic plugin without this coroutine); GatewayBroker calls `allows`.
        return self.allows(session, topic, action)


class GatewayAccountPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """One account checked in memory; other user names are left to the other plugins (None)."""

    @dataclass
    class Config:
        username: str = ""
        password: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        config: GatewayAccountPlugin.Config = self.config
        if session.username != config.username:
            return None
        return hmac.compare_digest((session.password or "").encode(), config.password.encode())
