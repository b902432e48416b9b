"""The exported JSON Schemas are current, and the core imports no framework."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

import gateway.core
from gateway.schemas import config_schema, events_schema, render
from tests.helpers import EVENTS_SCHEMA, SCHEMAS

REPO = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("pydantic", "aiomqtt", "paho", "amqtt", "serial_asyncio_fast", "serial", "aiosqlite", "structlog")


@pytest.mark.parametrize(
    ("name", "build"), [("config.schema.json", config_schema), ("events.schema.json", events_schema)]
)
def test_exported_schema_is_current(name: str, build: object) -> None:
    assert callable(build)
    committed = (SCHEMAS / name).read_text()
    assert committed == render(build()), f"docs/schemas/{name} is stale: run `python -m gateway.schemas`"


def test_shipped_configs_validate_against_the_config_schema() -> None:
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "config.schema.json").read_text()))
    for path in (REPO / "config").glob("*.toml"):
        validator.validate(tomllib.loads(path.read_text()))


def test_event_schema_rejects_what_the_contract_forbids() -> None:
    good = {
        "event_id": "7d3c1a7e-2f0b-4f7e-9a53-0c3f1c9b2a11",
        "seq": 1,
        "ts": "2026-12-01T10:00:00.000Z",
        "gateway": "gw1",
        "type": "session.confirmed",
        "session_id": "s1",
        "gate": None,
    }
    EVENTS_SCHEMA.validate(good)
    for bad in (
        {**good, "seq": 0},
        {**good, "type": "session.teleported"},
        {k: v for k, v in good.items() if k != "gate"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            EVENTS_SCHEMA.validate(bad)


def test_core_imports_no_framework() -> None:
    modules = [f"gateway.core.{m.name}" for m in pkgutil.iter_modules(gateway.core.__path__)]
    code = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r} or m.split('.')[0] in "
        "('drivers', 'simulators') or (m.startswith('gateway.') and not m.startswith('gateway.core'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert len(modules) >= 10
    assert out.stdout.strip() == "[]", f"gateway.core pulled in: {out.stdout.strip()}"
