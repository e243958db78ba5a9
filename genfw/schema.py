"""What a component's params are, and the recipe JSON schema for editors (``genfw plugins --params``,
``genfw schema``).

The schema is the recipe model's own (pydantic, JSON Schema draft 2020-12) with every component
slot narrowed to the registered names and, per name, that component's ``Params`` (and a prior's
``SamplerParams`` for ``sample.params``), so an editor with a YAML language server completes and
checks recipe keys. Components whose plugin fails to import are left out and reported.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from genfw.config import Recipe
from genfw.errors import GenfwError
from genfw.registry import Registry

SCHEMA_ID = "https://genfw.invalid/recipe.schema.json"  # an identifier, never fetched


# --------------------------------------------------------------------------------------------
# params of one component


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return " | ".join(_type_name(a) for a in args)
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name


def _constraints(field: Any) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"),
                          ("max_length", "max length")):
            value = getattr(m, attr, None)
            if value is not None:
                out.append(f"{sym} {value}")
    return ", ".join(out)


def describe_params(model: type[BaseModel]) -> list[dict[str, str]]:
    """One row per field of a params model: name, type (with bounds), default, description."""
    rows = []
    for name, field in model.model_fields.items():
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        kind = _type_name(field.annotation)
        bounds = _constraints(field)
        rows.append({"name": name, "type": f"{kind} ({bounds})" if bounds else kind, "default": default,
                     "description": field.description or ""})
    return rows


def find_component(registry: Registry, ref: str) -> tuple[str, str]:
    """``NAME`` or ``KIND:NAME`` -> (kind, name); an error if unknown or ambiguous."""
    kind, _, name = ref.rpartition(":")
    if kind:
        registry.get(kind, name)
        return kind, name
    matches = sorted({k for (k, n) in [*registry._entries, *registry.conflicts] if n == ref})
    if not matches:
        known = ", ".join(sorted({f"{e.kind}:{e.name}" for e in registry.entries()}))
        raise GenfwError(f"no component is named '{ref}'; registered: {known}{registry.broken_hint()}")
    if len(matches) > 1:
        raise GenfwError(f"'{ref}' names a {' and a '.join(matches)}: say which, e.g. {matches[0]}:{ref}")
    return matches[0], ref


# --------------------------------------------------------------------------------------------
# the recipe schema


def _pointer(text: str) -> str:
    return text.replace("~", "~0").replace("/", "~1")


class _Defs:
    """Collects the ``$defs`` of many params models under unique, prefixed names."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def add(self, key: str, model: type[BaseModel]) -> dict[str, str]:
        """Add ``model``'s schema as ``$defs[key]`` (its own definitions prefixed); return a $ref to it."""
        schema = model.model_json_schema(mode="validation", ref_template=f"#/$defs/{_pointer(key)}~1{{model}}")
        for name, sub in schema.pop("$defs", {}).items():
            self.defs[f"{key}/{name}"] = sub
        self.defs[key] = schema
        return {"$ref": f"#/$defs/{_pointer(key)}"}


def _slot(registry: Registry, kind: str, defs: _Defs, skipped: list[str], extra: dict[str, Any],
          required: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    """Schema of one ``{name, params, ...}`` slot: the registered names, and per name its params."""
    names, branches = [], []
    for entry in registry.entries(kind):
        try:
            cls = entry.load()
            ref = defs.add(f"{kind}.{entry.name}", cls.Params)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
            skipped.append(f"{kind} '{entry.name}' ({entry.dist}): {e}")
            continue
        names.append(entry.name)
        branches.append({"if": {"properties": {"name": {"const": entry.name}}, "required": ["name"]},
                         "then": {"properties": {"params": ref}}})
    return {
        "type": "object",
        "properties": {"name": {"enum": names, "description": f"a registered {kind} (genfw plugins)"},
                       "params": {"type": "object", "description": f"the {kind}'s params (genfw plugins --params NAME)"},
                       **extra},
        "required": list(required),
        "additionalProperties": False,
        **({"allOf": branches} if branches else {}),
    }


def recipe_schema(registry: Registry) -> tuple[dict[str, Any], list[str]]:
    """The recipe JSON schema with every registered component's params; and what was left out."""
    schema = Recipe.model_json_schema(mode="validation")
    defs, skipped = _Defs(), []
    checkpoint = {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "load this instead of training"}
    backbone = _slot(registry, "backbone", defs, skipped, {})
    props = schema["properties"]
    props["data"] = _slot(registry, "dataset", defs, skipped, {})
    props["tokenizer"] = _slot(registry, "tokenizer", defs, skipped, {"checkpoint": checkpoint})
    level = _slot(registry, "prior", defs, skipped, {"backbone": backbone, "checkpoint": checkpoint},
                  required=("name", "backbone"))
    prior = _slot(registry, "prior", _Defs(), [], {"backbone": backbone, "checkpoint": checkpoint,
                                                 "levels": {"type": "array", "items": level,
                                                            "description": "one prior per tokenizer level, coarsest first"}},
                  required=())
    prior["properties"]["name"] = level["properties"]["name"]
    props["prior"] = prior
    if "log" in props:  # training loggers: a name, or {name, params}
        logger = _slot(registry, "logger", defs, skipped, {})
        props["log"] = {"type": "array", "description": props["log"].get("description", "training loggers"),
                        "items": {"anyOf": [{"enum": logger["properties"]["name"]["enum"]}, logger]}}
    # sample.params are the SamplerParams of the prior named at the top level
    samplers = []
    for entry in registry.entries("prior"):
        if entry.name not in level["properties"]["name"]["enum"]:
            continue
        ref = defs.add(f"sampler.{entry.name}", entry.load().SamplerParams)
        samplers.append({"if": {"properties": {"prior": {"properties": {"name": {"const": entry.name}},
                                                         "required": ["name"]}}, "required": ["prior"]},
                         "then": {"properties": {"sample": {"properties": {"params": ref}}}}})
    if samplers:
        schema["allOf"] = samplers
    schema.setdefault("$defs", {}).update(defs.defs)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "genfw recipe"
    return schema, skipped
