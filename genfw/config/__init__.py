"""Recipe schema, YAML loading, ``key=value`` / ``~key`` overrides and validation against the registry.

A recipe names components by registered name; each component's own pydantic ``Params`` model
validates its ``params``, so a typo fails before any work starts, with its full dotted path.
"""

from genfw.config.overrides import (
    apply_overrides,
    check_expansion,
    load_yaml,
    parse_override,
    parse_value,
    swap_component,
)
from genfw.config.recipe import (
    ComponentSpec,
    EvaluateSpec,
    GroupSpec,
    LatentSpec,
    PriorSection,
    PriorSpec,
    Recipe,
    SampleSpec,
    TokenizerSpec,
    TrainSection,
    TrainSpec,
)
from genfw.config.validate import ResolvedRecipe, load_recipe, parse_recipe, validate_recipe
from genfw.params import format_validation_error, validate_params

__all__ = ["ComponentSpec", "EvaluateSpec", "GroupSpec", "LatentSpec", "PriorSection", "PriorSpec", "Recipe",
           "ResolvedRecipe", "SampleSpec", "TokenizerSpec", "TrainSection", "TrainSpec", "apply_overrides",
           "check_expansion", "format_validation_error", "load_recipe", "load_yaml", "parse_override", "parse_recipe",
           "parse_value", "swap_component", "validate_params", "validate_recipe"]
