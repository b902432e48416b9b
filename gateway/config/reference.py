"""The key reference of docs/configuration.md, generated from the models' descriptions."""

from __future__ import annotations

import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.config.model import GatewayConfig


def _type_label(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_label(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is list:
        return f"array of {_type_label(args[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_label(a) for a in args if a is not type(None))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, str(annotation))


def _default_label(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(table defaults)"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    value = field.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{json.dumps(value)}`"


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """(model, is an array of tables) when the field holds tables."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is list:
        inner = _nested_model(args[0])
        return (inner[0], True) if inner else None
    if origin in (Union, types.UnionType):
        for arg in args:
            inner = _nested_model(arg)
            if inner:
                return inner
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None


def config_reference_markdown() -> str:
    """The key reference of docs/configuration.md, generated from the models' descriptions."""
    sections: list[str] = []
    seen: dict[type[BaseModel], str] = {}

    def table(model: type[BaseModel], heading: str, level: int, prefix: str) -> None:
        seen[model] = heading
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        nested: list[tuple[type[BaseModel], str, bool]] = []
        for field_name, field in model.model_fields.items():
            key = field.alias or field_name
            rows.append(
                f"| `{key}` | {_type_label(field.annotation)} | {_default_label(field)} | {field.description} |"
            )
            inner = _nested_model(field.annotation)
            if inner is not None:
                nested.append((inner[0], prefix + key, inner[1]))
        doc = (model.__doc__ or "").strip()
        sections.append(f"{'#' * level} {heading}\n\n{doc}\n\n" + "\n".join(rows) + "\n")
        # The top level's tables are siblings of it in the document, deeper tables are subsections.
        child_level = min(level + 1, 4) if prefix else level
        for inner_model, inner_name, inner_array in nested:
            inner_heading = f"`[[{inner_name}]]`" if inner_array else f"`[{inner_name}]`"
            if inner_model in seen:
                sections.append(f"{'#' * child_level} {inner_heading}\n\nSame keys as {seen[inner_model]}.\n")
            else:
                table(inner_model, inner_heading, child_level, inner_name + ".")

    table(GatewayConfig, "Top level", 3, "")
    return "\n".join(sections)
