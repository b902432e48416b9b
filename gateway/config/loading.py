"""Reading a config file: TOML, validation, and every error as one line named by its field path."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.resources import files
from pathlib import Path

from pydantic import ValidationError

from gateway.config.base import ConfigError, Loc, Problems, format_loc
from gateway.config.model import GatewayConfig, cross_check_raw

SYSTEM_CONFIG_PATH = Path("/etc/parking-gateway/gateway.toml")


def _error_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, Problems):
            lines.extend(f"{format_loc(loc + sub) or '(top level)'}: {msg}" for sub, msg in cause.problems)
            continue
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif isinstance(cause, ValueError):
            message = str(cause)
        else:
            message = err["msg"]
            if isinstance(err["input"], str | int | float):
                message += f" (got {err['input']!r})"
        lines.append(f"{format_loc(loc) or '(top level)'}: {message}")
    return lines


def parse_config(text: str, source: str = "<string>") -> GatewayConfig:
    """Validate TOML text; raises ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError carries the position only in its message.
        m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc), re.DOTALL)
        if m is None:
            raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
        raise ConfigError([f"{source}: invalid TOML at line {m[2]}, column {m[3]}: {m[1]}"]) from None
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = _error_lines(exc)
    # A field error stops pydantic before the cross-checks: run them on what did validate, so that one
    # run names every problem. When only the cross-checks failed they are in `lines` already.
    for loc, message in cross_check_raw(data):
        line = f"{format_loc(loc)}: {message}"
        if line not in lines:
            lines.append(line)
    raise ConfigError(lines)


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a config file; raises ConfigError for everything that is wrong."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse_config(text, str(path))


def bundled_demo_path() -> Path:
    """The demo site's config shipped inside the package."""
    return Path(str(files("gateway").joinpath("data", "demo.toml")))


def default_config_path() -> Path:
    """`$PARKING_GATEWAY_CONFIG`, else /etc/parking-gateway/gateway.toml if it exists, else the bundled demo."""
    from_env = os.environ.get("PARKING_GATEWAY_CONFIG", "")
    if from_env:
        return Path(from_env)
    if SYSTEM_CONFIG_PATH.exists():
        return SYSTEM_CONFIG_PATH
    return bundled_demo_path()
