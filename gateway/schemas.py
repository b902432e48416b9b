"""JSON Schemas for integrators, generated from the models: the config file and the event stream.

`python -m gateway.schemas [DIR]` writes `config.schema.json` and `events.schema.json` (default `docs/schemas`);
a test fails when the committed files differ from what the models generate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from gateway.config import GatewayConfig
from gateway.core.events import EVENT_TYPES, Event

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_ENVELOPE: dict[str, Any] = {
    "event_id": {"type": "string", "format": "uuid", "description": "Unique; consumers dedupe by it."},
    "seq": {"type": "integer", "minimum": 1, "description": "Gapless per gateway, in commit order."},
    "ts": {"type": "string", "format": "date-time", "description": "RFC 3339, milliseconds, UTC."},
    "gateway": {"type": "string", "description": "The gateway's id."},
}


def config_schema() -> dict[str, Any]:
    schema = GatewayConfig.model_json_schema(by_alias=True)
    return {"$schema": SCHEMA_DIALECT, "$id": "parking-gateway/config.schema.json", **schema}


def _event_schema(cls: type[Event], defs: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(cls).json_schema(ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    fields = schema["properties"]
    return {
        "title": cls.TYPE,
        "description": (cls.__doc__ or "").strip() or f"The `{cls.TYPE}` event.",
        "type": "object",
        "properties": {**_ENVELOPE, "type": {"const": cls.TYPE}, **fields},
        # Every field is present; one that does not apply is null.
        "required": [*_ENVELOPE, "type", *fields],
        "additionalProperties": False,
    }


def events_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    variants = {cls.TYPE: _event_schema(cls, defs) for cls in EVENT_TYPES}
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": "parking-gateway/events.schema.json",
        "title": "parking-gateway event (contract §4)",
        "description": "One message on R/events or in the upstream outbox; `type` selects the variant.",
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"enum": list(variants)}},
        "allOf": [
            {"if": {"properties": {"type": {"const": t}}}, "then": {"$ref": f"#/$defs/{_def_name(t)}"}}
            for t in variants
        ],
        "$defs": {**defs, **{_def_name(t): v for t, v in variants.items()}},
    }


def _def_name(event_type: str) -> str:
    return "event." + event_type


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in (("config.schema.json", config_schema()), ("events.schema.json", events_schema())):
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(path)
