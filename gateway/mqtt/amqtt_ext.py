"""What the gateway adds to amqtt 0.12.1, written against its internals (the version is pinned in pyproject).

Imported only when the embedded broker starts: amqtt pulls in websockets, transitions and dacite.

- ``GatewayBroker``: amqtt's CONNECT handling sends the connecting client the retained messages matching
  *every* subscription filter in the broker, whoever subscribed it, without an ACL check (``Broker.
  _handle_client_session``, after "Publish retained messages to a pre-existing session's subscriptions").
  Here a connecting session gets the retained messages of its own subscriptions only, each filter checked
  against the ACL again (a persistent session may be resumed by another account). A will is published only
  where its client may publish (amqtt does not check it).
- ``AclPlugin``: the ACL of gateway.mqtt.acl, in place of amqtt's TopicAccessControlListPlugin, which lets
  everyone publish anything when the publish ACL is empty and lets a granted `a/+` subscribe to `a/#`.
- ``GatewayAccountPlugin``: the gateway's own in-process account when there is no users_file.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from gateway.mqtt.acl import ANONYMOUS, covers

_HOOKED = (
    "_publish_session_retained_messages",
    "_publish_retained_messages_for_subscription",
    "_client_message_loop",
    "_handle_disconnect",
    "_topic_filtering",
)
_missing = [name for name in _HOOKED if not callable(getattr(Broker, name, None))]
if _missing:
    # The retained-message fix hooks these; without them it would silently do nothing.
    raise ImportError(f"amqtt's Broker lacks {', '.join(_missing)}: unsupported amqtt version")


class GatewayBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker, with retained messages on CONNECT limited to the session's own subscriptions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replayed: Session | None = None

    async def _publish_session_retained_messages(self, session: Session) -> None:
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

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        self._replayed = None
        await super()._client_message_loop(client_session, handler)

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

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or not topic:
            return False
        who = session.username if session.username in self._accounts else ANONYMOUS
        # Delivery (RECEIVE) is reading: the subscribe rules decide it too.
        granted = self._publish if action == Action.PUBLISH else self._subscribe
        return covers(granted.get(who, ()), topic)


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
