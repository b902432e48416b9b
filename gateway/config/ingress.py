"""`[ingress]`: device topic filters per driver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gateway.config.base import Loc, Problems, StrictModel, topic_filter_problem


def _filter_problem(topic_filter: str) -> str | None:
    problem = topic_filter_problem(topic_filter)
    if problem is None and "+" not in topic_filter.split("/"):
        return f"needs a '+' level (it matches the device id): {topic_filter!r}"
    return problem


IngressKind = Literal["sensors", "tts", "cameras", "platerecognizer"]


class IngressConfig(StrictModel):
    """Device topics on the local broker (MQTT filters); the device id is the level matched by the first `+`
    (for `tts`, the last: its first `+` is the application)."""

    sensors: list[str] = Field(["sensors/+/state"], description="JSON occupancy sensors.")
    tts: list[str] = Field(["v3/+/devices/+/up"], description="LoRaWAN sensors via The Things Stack v3 uplinks.")
    cameras: list[str] = Field(["cameras/+/reads"], description="JSON plate cameras.")
    platerecognizer: list[str] = Field(["cameras/+/platerecognizer"], description="Plate Recognizer Stream webhooks.")

    @field_validator("sensors", "tts", "cameras", "platerecognizer")
    @classmethod
    def _valid_filters(cls, value: list[str]) -> list[str]:
        problems: list[tuple[Loc, str]] = []
        for i, topic_filter in enumerate(value):
            problem = _filter_problem(topic_filter)
            if problem is not None:
                problems.append(((i,), problem))
        if problems:
            raise Problems(problems)
        return value

    def by_kind(self) -> tuple[tuple[IngressKind, list[str]], ...]:
        return (
            ("sensors", self.sensors),
            ("tts", self.tts),
            ("cameras", self.cameras),
            ("platerecognizer", self.platerecognizer),
        )
