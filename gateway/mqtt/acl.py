"""Access rules for the embedded broker: a Mosquitto-style ACL file, or the default device rule.

File format (a subset of mosquitto's `acl_file`, so integrators can reuse what they know):

    # the gateway's own account
    user gateway
    topic readwrite #
    user ops
    topic write parking/gw1/request/#
    topic read parking/gw1/#
    pattern write sensors/%u/state

`pattern` applies to every account of the users file, `%u` being the username. `topic`/`pattern` take
`read`, `write` or `readwrite` (the default). Topic rules before any `user` line apply to anonymous clients.

Without an ACL file: the gateway's account may do everything; every other account may publish only to its
own ingress topics (each `[ingress]` filter with the device's `+` replaced by the username) and subscribe to
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.mqtt.topics import device_level


class AclError(Exception):
    pass


@dataclass
class Acl:
    publish: dict[str, list[str]] = field(default_factory=dict)
    subscribe: dict[str, list[str]] = field(default_factory=dict)

    def grant(self, user: str, access: str, topic: str) -> None:
        if access in ("write", "readwrite"):
            self.publish.setdefault(user, []).append(topic)
        if access in ("read", "readwrite"):
            self.subscribe.setdefault(user, []).append(topic)


def parse_acl(text: str, users: list[str], source: str = "acl") -> Acl:
    acl = Acl()
    current = "anonymous"
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
            if kind == "topic":
                acl.grant(current, access, topic)
            else:
                for user in users:
                    acl.grant(user, access, topic.replace("%u", user))
            continue
        raise AclError(f"{source}:{number}: cannot read {raw.strip()!r}")
    return acl


def device_topic(topic_filter: str, kind: str, user: str) -> str:
    """The ingress filter with the device's `+` replaced by the user name."""
    levels = topic_filter.split("/")
    plus = [i for i, level in enumerate(levels) if level == "+"]
    if plus:
        levels[plus[device_level(kind)]] = user
    return "/".join(levels)


def default_acl(gateway_user: str | None, users: list[str], ingress: Iterable[tuple[str, list[str]]]) -> Acl:
    acl = Acl()
    ingress = list(ingress)
    for user in users:
        if user == gateway_user:
            continue
        for kind, filters in ingress:
            for f in filters:
                acl.grant(user, "write", device_topic(f, kind, user))
        acl.subscribe.setdefault(user, [])
    if gateway_user is not None:
        acl.grant(gateway_user, "readwrite", "#")
    return acl


def load_acl(path: Path, users: list[str]) -> Acl:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AclError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_acl(text, users, str(path))
