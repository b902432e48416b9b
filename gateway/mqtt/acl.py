"""Access rules for the embedded broker: a Mosquitto-style ACL file, or the default rule.

File format (a subset of mosquitto's `acl_file`, so integrators can reuse what they know):

    # anonymous clients (rules before any `user` line)
    topic read parking/gw1/lots/+/availability
    # the gateway's own account
    user gateway
    topic readwrite #
    user ops
    topic write parking/gw1/request/#
    topic read parking/gw1/#
    pattern write sensors/%u/state

`pattern` applies to every account of the users file, `%u` being the username. `topic`/`pattern` take
`read`, `write` or `readwrite` (the default). Topic rules before any `user` line apply to anonymous clients.

Who is who: a client is an account only when the broker checked its password (a users_file line, or the
gateway's own in-process account when there is no users_file). Every other client is anonymous, whatever
user name it sends: without a users_file nothing can vouch for a name.

The rules apply to anonymous clients too; nothing is allowed that no rule grants (an empty ACL allows
nothing). Without an ACL file, the default rule:

- the gateway's own account may do everything;
- every other account may publish only to its own ingress topics (each `[ingress]` filter with the device's
  `+` replaced by the username) and subscribe to nothing;
- anonymous clients (`allow_anonymous = true`) may publish to the `[ingress]` filters (any device: there is
  no name to check) and subscribe to what the gateway publishes for everyone: `R/status`,
  `R/lots/+/availability`, `R/slots/+`, `R/gates/+`, `R/events`, `R/health`. Requests (`R/request/#`),
  replies and `R/gates/+/open` need an account that an ACL file grants them.

Subscriptions are checked filter against filter: a requested filter is granted only when every topic it
can match is matched by a granted filter (`a/+` does not grant `a/#`). A publish is the same check with a
topic name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.mqtt.topics import device_level

# The identity of every client without a checked account. amqtt treats an empty user name as none, so no
# account can be called this.
ANONYMOUS = ""


class AclError(Exception):
    pass


@dataclass
class Acl:
    """Granted filters per identity (a username, or ANONYMOUS)."""

    publish: dict[str, list[str]] = field(default_factory=dict)
    subscribe: dict[str, list[str]] = field(default_factory=dict)

    def grant(self, user: str, access: str, topic: str) -> None:
        if access in ("write", "readwrite"):
            self.publish.setdefault(user, []).append(topic)
        if access in ("read", "readwrite"):
            self.subscribe.setdefault(user, []).append(topic)


def valid_filter(topic_filter: str) -> bool:
    """MQTT 3.1.1 §4.7.1: `#` alone and last, `+` alone in its level, not empty."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def covers(granted: Iterable[str], requested: str) -> bool:
    """Whether every topic that the filter `requested` matches is matched by one of the `granted` filters.

    Together, not one by one: `a` and `a/+/#` cover `a/#`. A topic name is a filter without wildcards, so
    the same check decides a publish. Filters must be valid (`valid_filter`).
    """
    # At the top `#` has no parent level to match: it is every topic of one level or more.
    levels = ["+", "#"] if requested == "#" else requested.split("/")
    grants = [g.split("/") for g in granted]
    if levels[0].startswith("$"):
        # [MQTT-4.7.2-1] a filter that starts with a wildcard matches no topic that starts with `$`
        grants = [g for g in grants if g[0] not in ("+", "#")]
    return _covers(levels, grants)


def _covers(levels: list[str], grants: list[list[str]]) -> bool:
    # `#` matches what is left, including nothing (`a/#` matches `a`).
    if any(g and g[0] == "#" for g in grants):
        return True
    if not levels:
        return any(not g for g in grants)
    head, rest = levels[0], levels[1:]
    if head == "#":
        # The parent level itself, then one or more levels below it.
        return _covers([], grants) and _covers(["+", "#"], grants)
    if head == "+":
        # A level can be any string, including one that no grant names: only a grant's `+` matches them all.
        return _covers(rest, [g[1:] for g in grants if g and g[0] == "+"])
    return _covers(rest, [g[1:] for g in grants if g and g[0] in ("+", head)])


def _substitute(topic: str, user: str) -> str:
    if "%u" in topic and any(c in user for c in "/+#"):
        raise AclError(f"user name {user!r} cannot stand for a topic level (it contains '/', '+' or '#')")
    return topic.replace("%u", user)


def parse_acl(text: str, users: list[str], source: str = "acl") -> Acl:
    acl = Acl()
    current = ANONYMOUS
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):  # only whole-line comments: `#` is also the MQTT wildcard
            continue
        words = line.split()
        kind = words[0]
        if kind == "user" and len(words) == 2:
            current = words[1]
            continue
        if kind in ("topic", "pattern") and len(words) in (2, 3):
            access, topic = ("readwrite", words[1]) if len(words) == 2 else (words[1], words[2])
            if access not in ("read", "write", "readwrite"):
                raise AclError(f"{source}:{number}: access must be read, write or readwrite, not {access!r}")
            if not valid_filter(topic.replace("%u", "u")):
                raise AclError(f"{source}:{number}: not a valid MQTT topic filter: {topic!r}")
            if kind == "topic":
                acl.grant(current, access, topic)
            else:
                for user in users:
                    acl.grant(user, access, _substitute(topic, user))
            continue
        raise AclError(f"{source}:{number}: cannot read {raw.strip()!r}")
    return acl


def device_topic(topic_filter: str, kind: str, user: str) -> str:
    """The ingress filter with the device's `+` replaced by the user name."""
    levels = topic_filter.split("/")
    plus = [i for i, level in enumerate(levels) if level == "+"]
    if plus:
        levels[plus[device_level(kind)]] = "%u"
    return _substitute("/".join(levels), user)


def public_topics(root: str) -> list[str]:
    """What the gateway publishes for everyone under `root` = R: states and events, not replies."""
    return [
        f"{root}/status",
        f"{root}/lots/+/availability",
        f"{root}/slots/+",
        f"{root}/gates/+",
        f"{root}/events",
        f"{root}/health",
    ]


def default_acl(
    gateway_user: str | None,
    users: list[str],
    ingress: Iterable[tuple[str, list[str]]],
    *,
    root: str,
    anonymous: bool,
) -> Acl:
    acl = Acl()
    ingress = list(ingress)
    for user in users:
        if user == gateway_user:
            continue
        for kind, filters in ingress:
            for f in filters:
                acl.grant(user, "write", device_topic(f, kind, user))
        acl.subscribe.setdefault(user, [])
    if anonymous:
        for _, filters in ingress:
            for f in filters:
                acl.grant(ANONYMOUS, "write", f)
        for topic in public_topics(root):
            acl.grant(ANONYMOUS, "read", topic)
    if gateway_user is not None:
        acl.grant(gateway_user, "readwrite", "#")
    return acl


def load_acl(path: Path, users: list[str]) -> Acl:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AclError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_acl(text, users, str(path))
