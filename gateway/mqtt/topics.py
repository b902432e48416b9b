"""MQTT topic names of the contract (§3) and filter matching that returns the wildcard levels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    """The gateway's own topics under R = <topic_root>/<gateway.id>."""

    root: str

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def health(self) -> str:
        return f"{self.root}/health"

    @property
    def requests(self) -> str:
        return f"{self.root}/request/+"

    def availability(self, lot: str) -> str:
        return f"{self.root}/lots/{lot}/availability"

    def slot(self, slot: str) -> str:
        return f"{self.root}/slots/{slot}"

    def response(self, verb: str) -> str:
        return f"{self.root}/response/{verb}"

    def gate(self, gate: str) -> str:
        return f"{self.root}/gates/{gate}"

    @property
    def gate_opens(self) -> str:
        """`R/gates/+/open`: Home Assistant's open button (contract §3.4)."""
        return f"{self.root}/gates/+/open"


def device_level(kind: str) -> int:
    """Which `+` of an ingress filter matches the device id: the first, but the last for The Things Stack,
    whose topics put the application first (v3/<app>/devices/<device>/up)."""
    return -1 if kind == "tts" else 0


def match(topic_filter: str, topic: str) -> list[str] | None:
    """The levels matched by `+` (and the rest for `#`) when `topic` matches `topic_filter`, else None."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    captured: list[str] = []
    for i, level in enumerate(f_levels):
        if level == "#":
            captured.append("/".join(t_levels[i:]))
            return captured
        if i >= len(t_levels):
            return None
        if level == "+":
            captured.append(t_levels[i])
        elif level != t_levels[i]:
            return None
    return captured if len(f_levels) == len(t_levels) else None
