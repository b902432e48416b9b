"""The shared strict base of every config table, id patterns, and problems reported by field path."""

from __future__ import annotations

import json
import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

ID_CHARS = r"[A-Za-z0-9_.:-]{1,64}"
DEVICE_ID = r"^[A-Za-z0-9_.:@-]{1,64}$"
TYPE_WORD = r"^[A-Za-z0-9_-]{1,32}$"
# A topic prefix: one or more non-empty levels, no wildcards.
TOPIC_ROOT = r"^[^/+#\x00]+(/[^/+#\x00]+)*$"

Loc = tuple[str | int, ...]

TypeWord = Annotated[str, Field(pattern=TYPE_WORD)]
Plate = Annotated[str, Field(min_length=1, max_length=32)]


class Problems(ValueError):
    """Validation failures with paths relative to the validated object; expanded by the error formatter."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{format_loc(loc) or '.'}: {msg}" for loc, msg in problems))
        self.problems = problems


class ConfigError(Exception):
    """Everything wrong with a configuration, one line per problem, each named by its field path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class StrictModel(BaseModel):
    # strict: TOML already has types, so "yes" for a boolean or "80" for a port is a mistake, not a value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def check_secret_source(password: str | None, password_file: str | None) -> list[tuple[Loc, str]]:
    if password is not None and password_file is not None:
        return [(("password_file",), "set either password or password_file, not both")]
    return []


def topic_filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT filter, or None."""
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "NUL character in topic filter"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' is only allowed as the whole last level: {topic_filter!r}"
        if "+" in level and level != "+":
            return f"'+' must be a whole level: {topic_filter!r}"
    return None


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            out += f".{key}" if out else key
    return out
