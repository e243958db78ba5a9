"""Component parameters: the ``Params`` base model and its validation, with one-line errors.

Every component kind's ``Params`` derives from :class:`Params` (unknown keys are errors); a
recipe's or a file's params are checked with :func:`validate_params`, whose messages name the
full dotted path of each problem (``prior.backbone.params.depht: unknown key (allowed keys:
...)``). This module sits below both the component interfaces and the recipe schema, so that
either can validate without importing the other. Nothing here knows a component or the registry.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from genfw.errors import ConfigError


class Params(BaseModel):
    """Base of every component's params model: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class NoParams(Params):
    """Params model of a component that takes none."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each with its full dotted path (and allowed keys for typos)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key missing")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields) or "none"


def validate_params(model: type[BaseModel], params: dict[str, Any], path: str) -> BaseModel:
    """Validate ``params`` with a component's Params model; errors name ``path.key``."""
    try:
        return model.model_validate(params or {})
    except ValidationError as e:
        msg = format_validation_error(e, path)
        if any(x["type"] == "extra_forbidden" for x in e.errors()):
            msg += f" (allowed keys: {_allowed_keys(model)})"
        raise ConfigError(msg) from None


def validated(model: type[Params], params: Any) -> Params:
    """``params`` (None, a dict or a pydantic model) as an instance of ``model``; ConfigError if invalid."""
    if isinstance(params, model):
        return params
    if params is None:
        params = {}
    elif isinstance(params, BaseModel):
        params = params.model_dump()
    return validate_params(model, params, "params")
