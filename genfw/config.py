"""Recipe schema, YAML loading, ``key=value`` / ``~key`` overrides and validation against the registry.

A recipe names components by registered name; each component's own pydantic ``Params`` model
validates its ``params``, so a typo fails before any work starts, with its full dotted path.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genfw import io, limits
from genfw.errors import ConfigError, GenfwError
from genfw.loggers import validate_log
from genfw.params import format_validation_error, validate_params
from genfw.registry import Registry, get_registry


def _takes_number(annotation: Any) -> bool:
    """Whether a field's type admits a number (int, float | None, list[int]...) but not bool."""
    if annotation in (int, float):
        return True
    return any(_takes_number(a) for a in getattr(annotation, "__args__", ()) if a is not type(None))


class _Strict(BaseModel):
    # allow_inf_nan=False: a learning rate of .inf or .nan validates as a float but trains nothing
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_int(cls, v, info):
        """``steps: true`` is not 1 step: pydantic's lax mode would take a bool as a number."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _takes_number(field.annotation) and bool not in getattr(field.annotation, "__args__", ()):
            if isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
                raise ValueError("a number is needed, not true/false")
        return v


class ComponentSpec(_Strict):
    """A registered component and its params."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


def _one_source(spec):
    if spec.checkpoint and spec.init_from:
        raise ValueError("give checkpoint (use these weights as they are, no training) or init_from "
                         "(start training from these weights), not both")
    return spec


class TokenizerSpec(ComponentSpec):
    checkpoint: str | None = None  # load this instead of training
    init_from: str | None = None  # a genfw model file or run directory: fine-tune from its weights

    _one_source = model_validator(mode="after")(_one_source)


class PriorSpec(ComponentSpec):
    backbone: ComponentSpec
    checkpoint: str | None = None  # load this instead of training
    init_from: str | None = None  # a genfw model file or run directory: fine-tune from its weights

    _one_source = model_validator(mode="after")(_one_source)


class PriorSection(_Strict):
    """One prior spec for every level, or ``levels`` with one spec per level (coarsest first)."""

    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    backbone: ComponentSpec | None = None
    checkpoint: str | None = None
    init_from: str | None = None  # a model file (one level) or a run directory (its prior<i> per level)
    levels: list[PriorSpec] | None = None

    _one_source = model_validator(mode="after")(_one_source)

    def for_level(self, index: int, num_levels: int) -> PriorSpec:
        if self.levels is not None:
            if len(self.levels) != num_levels:
                raise ConfigError(
                    f"prior.levels has {len(self.levels)} entries but the tokenizer has {num_levels} levels"
                )
            return self.levels[index]
        if self.name is None or self.backbone is None:
            raise ConfigError("prior needs 'name' and 'backbone' (or 'levels', one spec per level)")
        return PriorSpec(name=self.name, params=self.params, backbone=self.backbone,
                         checkpoint=self.checkpoint if num_levels == 1 else None, init_from=self.init_from)


def _check_betas(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in v):
        raise ValueError("Adam betas must lie in [0, 1)")
    return v


class GroupSpec(_Strict):
    """What ``train.<stage>.groups.<name>`` may override for one parameter group's optimizer."""

    lr: float | None = Field(None, gt=0)
    betas: tuple[float, float] | None = None
    weight_decay: float | None = Field(None, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        return v if v is None else _check_betas(v)


class TrainSpec(_Strict):
    """Settings of the generic trainer for one stage."""

    steps: int = Field(1000, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(None, gt=0)
    # Per-group overrides, e.g. {"discriminator": {"lr": 1e-4}} for a GAN's second optimizer.
    groups: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        return _check_betas(v)

    @field_validator("groups")
    @classmethod
    def _groups_valid(cls, v):
        for name, opts in v.items():
            try:
                GroupSpec.model_validate(opts)
            except ValidationError as e:
                raise ValueError(f"group '{name}': {format_validation_error(e)}") from None
        return v
    ema_decay: float | None = Field(None, gt=0, lt=1)
    ema_every: int = Field(1, ge=1)
    # Seed of this stage's initial weights and training randomness (None: the recipe's seed);
    # `genfw ablate --seeds` varies the prior's alone, so the tokenizer and latents are shared.
    seed: int | None = Field(None, ge=0, le=limits.MAX_SEED)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype on CUDA; CPU is fp32
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    snapshot_every: int | None = Field(None, ge=1)  # write a loadable snapshot.safetensors (EMA weights if on)
    sample_every: int | None = Field(None, ge=1)  # priors: write a sample grid into previews/
    num_workers: int = Field(0, ge=0)
    compile: bool = False
    # Under torchrun: DistributedDataParallel (replicated weights), or FSDP2 `fully_shard`
    # (weights, gradients and optimizer state split over the ranks); see docs/distributed.md.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _ema_updated(self):
        # the EMA copy is updated every `ema_every` steps: beyond `steps` it would never be, and
        # the saved model would be the random initialisation
        if self.ema_decay and self.steps and self.ema_every > self.steps:
            raise ValueError(f"ema_every {self.ema_every} is larger than steps {self.steps}: the EMA weights would "
                             f"never be updated; use ema_every <= {self.steps} (or ema_decay: null)")
        return self


class TrainSection(_Strict):
    tokenizer: TrainSpec = Field(default_factory=TrainSpec)
    prior: TrainSpec = Field(default_factory=TrainSpec)


class LatentSpec(_Strict):
    flip: bool = False  # also store every image's horizontal flip (the SUNDAE paper does)
    shard_size: int = Field(8192, ge=1)
    batch_size: int = Field(64, ge=1)
    holdout: float = Field(0.05, ge=0, lt=1)  # fraction kept out of prior training for NLL


class SampleSpec(_Strict):
    n: int = Field(16, ge=1)
    labels: list[int] | None = None  # class of each sample, cycled; None = round-robin/uncond.
    batch_size: int = Field(16, ge=1)
    seed: int | None = Field(None, ge=0, le=limits.MAX_SEED)
    params: dict[str, Any] = Field(default_factory=dict)  # the prior's SamplerParams
    grid_columns: int | None = None


class EvaluateSpec(_Strict):
    metrics: list[str] = Field(default_factory=lambda: ["reconstruction", "nll", "fidelity"])
    n_samples: int = Field(256, ge=1)
    feature_extractor: str = "auto"  # auto | classifier | inception-v3-compat
    classifier_steps: int = Field(1500, ge=0)
    inception_weights: str | None = None
    batch_size: int = Field(64, ge=1)
    # The held-out images are split into two disjoint halves fixed by the seed; FID/KID/PRDC
    # references come only from this one (the other gives the real-vs-real floor).
    reference: Literal["test", "validation"] = "test"


class Recipe(_Strict):
    """A whole experiment: data, tokenizer, prior(s), training, sampling, evaluation."""

    name: str
    seed: int = Field(0, ge=0, le=limits.MAX_SEED)  # torch takes 64-bit seeds; genfw adds small offsets
    output_dir: str | None = None
    device: str = "auto"
    class_conditional: bool = True  # condition priors on labels when the data has them
    plugins: dict[str, str] = Field(default_factory=dict)  # distribution -> version spec needed
    data: ComponentSpec
    tokenizer: TokenizerSpec
    prior: PriorSection
    train: TrainSection = Field(default_factory=TrainSection)
    latents: LatentSpec = Field(default_factory=LatentSpec)
    sample: SampleSpec = Field(default_factory=SampleSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    # Training loggers (kind "logger"), each a name or {name, params}; see genfw.loggers.
    log: list[str | ComponentSpec] = Field(default_factory=lambda: ["jsonl"])

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        # the default run directory is runs/<name>: a name must not lead out of runs/
        if not v.strip() or v in (".", "..") or any(c in v for c in "/\\\0"):
            raise ValueError("the recipe name is the run's folder under runs/: give a plain name without "
                             "'/', '\\' or '..' (set output_dir to run elsewhere)")
        return v


# --------------------------------------------------------------------------------------------
# loading and overrides


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file (local or fsspec URL) into a dict, with clear errors."""
    if io.is_local(path) and os.path.isfile(io.local_path(path)):
        limits.check("recipe_bytes", os.path.getsize(io.local_path(path)), f"recipe {os.fspath(path)}: its size",
                     " bytes")
    try:
        data = io.read_bytes(path)
        limits.check("recipe_bytes", len(data), f"recipe {os.fspath(path)}: its size", " bytes")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {os.fspath(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {os.fspath(path)}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{os.fspath(path)}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{os.fspath(path)}: YAML nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{os.fspath(path)}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    check_expansion(raw, os.fspath(path))
    return raw


def check_expansion(value: Any, where: str) -> int:
    """Count the values of a YAML document with its aliases expanded; refuse cycles and blow-ups.

    PyYAML shares an aliased node instead of copying it, so ten nested aliases of ten items each
    (a "billion laughs") load in microseconds and hang whatever walks them later (fingerprinting,
    JSON). Counting with one memo entry per distinct node costs the document's own size.
    """
    bound = limits.limit("recipe_nodes")
    memo: dict[int, int] = {}
    active: set[int] = set()

    def size(x: Any) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        key = id(x)
        if key in memo:
            return memo[key]
        if key in active:
            raise ConfigError(f"{where}: a YAML alias contains itself (a recursive structure): remove it")
        active.add(key)
        total = 1
        for v in x.values() if isinstance(x, dict) else x:
            total += size(v)
            if total > bound:
                raise ConfigError(f"{where}: more than {bound:,} values once YAML aliases are expanded (an alias "
                                  f"bomb?): genfw's limit, raise it with {limits.env_var('recipe_nodes')}=N")
        active.discard(key)
        memo[key] = total
        return total

    try:
        return size(value)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def swap_component(node: Any, key: str, value: Any, path: str, keep: set[str] | None = None) -> str | None:
    """Setting a component's ``name`` to another one drops the old component's ``params``.

    ``node`` is the mapping about to get ``node[key] = value``. Params the old component took
    mean nothing to the new one (``--set prior.name=maskgit`` on a SUNDAE recipe), so they go,
    except keys in ``keep`` (set explicitly by an earlier override of the same command). Returns
    the note to show, or None when nothing was dropped.
    """
    if key != "name" or not isinstance(node, dict) or "name" not in node or node.get("name") == value:
        return None
    params = node.get("params")
    if not isinstance(params, dict) or not params:
        return None
    kept = {k: v for k, v in params.items() if k in (keep or set())}
    dropped = sorted(k for k in params if k not in kept)
    node["params"] = kept
    if not dropped:
        return None
    where = path.rsplit(".", 1)[0]
    return (f"{path}: '{node['name']}' -> '{value}' drops the params of '{node['name']}' "
            f"({', '.join(dropped)}); set {where}.params.KEY=VALUE for '{value}'")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None,
                    notes: list[str] | None = None) -> dict[str, Any]:
    """Apply overrides to a copy of ``raw``, left to right (see docs/recipes.md, "Overrides").

    ``a.b.c=value`` sets a key (the value is parsed as YAML, as in a recipe file); ``~a.b.c``
    deletes one (its default then applies). List items are addressed by index (``levels.0``).
    A new key may be added only inside an existing mapping; validation then rejects keys the
    schema or the component does not know, naming the full path. Replacing a component's name
    drops its old params (:func:`swap_component`); the notes saying so go to ``notes``.
    """
    out = copy.deepcopy(raw)
    explicit: set[tuple[str, ...]] = set()
    for item in overrides or []:
        path, value, delete = parse_override(item)
        keys = path.split(".")
        node: Any = out
        for i, key in enumerate(keys[:-1]):
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {item}: '{'.'.join(keys[:i])}' is not a mapping")
            if key not in node:
                if delete:
                    raise ConfigError(f"override {item}: '{'.'.join(keys[:i + 1])}' is not in the recipe")
                node[key] = {}
            node = node[key]
        last = keys[-1]
        if delete:
            if isinstance(node, dict) and last in node:
                del node[last]
            elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
                del node[int(last)]
            else:
                raise ConfigError(f"override {item}: '{path}' is not in the recipe (nothing to delete)")
        elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            params_path = (*keys[:-1], "params")
            keep = {p[len(params_path)] for p in explicit
                    if len(p) > len(params_path) and p[: len(params_path)] == params_path}
            if params_path in explicit and isinstance(node.get("params"), dict):
                keep |= set(node["params"])
            note = swap_component(node, last, value, ".".join(keys), keep)
            if note is not None and notes is not None:
                notes.append(note)
            node[last] = value
            explicit.add(tuple(keys))
        else:
            raise ConfigError(f"override {item}: '{'.'.join(keys[:-1])}' is not a mapping")
    return out


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_value(text: str) -> Any:
    """A command-line value: YAML (``10``, ``[3, 7]``, ``null``), ``1e-3`` a number too (YAML 1.1
    would read it as text); text that is not valid YAML (``{a``) stays text, for validation to judge."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = text
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    return value


def parse_override(item: str) -> tuple[str, Any, bool]:
    """``a.b=value`` -> ("a.b", parsed value, False); ``~a.b`` -> ("a.b", None, True).

    The value is YAML (``10``, ``0.001``, ``[3, 7]``, ``{steps: 50}``, ``null``), and ``1e-3``
    is a number too (YAML 1.1 would read it as text); text that is not valid YAML stays text.
    """
    text = item.strip()
    if text.startswith("~"):
        path, value, delete = text[1:], None, True
        if "=" in path:
            raise ConfigError(f"an override expects key.path=value (set) or ~key.path (delete, no value), got '{item}'")
    elif "=" in text:
        path, _, raw_value = text.partition("=")
        delete = False
        value = parse_value(raw_value)
    else:
        raise ConfigError(f"an override expects key.path=value (set) or ~key.path (delete), got '{item}'")
    keys = path.strip().split(".")
    if not all(k.strip() for k in keys):
        raise ConfigError(f"an override expects key.path=value (set) or ~key.path (delete), got '{item}'")
    return ".".join(k.strip() for k in keys), value, delete


# --------------------------------------------------------------------------------------------
# validation against the registry


@dataclass
class ResolvedRecipe:
    """A recipe whose components exist and whose params are validated models."""

    recipe: Recipe
    raw: dict[str, Any]
    data_params: BaseModel
    tokenizer_params: BaseModel
    prior_specs: list[PriorSpec]  # one per tokenizer level, coarsest first
    prior_params: list[BaseModel]
    backbone_params: list[BaseModel]
    sampler_params: list[BaseModel]


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _load_class(registry: Registry, kind: str, name: str, path: str):
    try:
        return registry.load(kind, name)
    except GenfwError as e:
        raise type(e)(f"{path}: {e}") from None


def validate_recipe(raw: dict[str, Any], registry: Registry | None = None,
                    num_levels: int | None = None) -> ResolvedRecipe:
    """Check the schema, every component name, every params block and the combination.

    ``num_levels`` is the tokenizer's level count; when None it is read off a tokenizer built
    on the meta device (no memory is allocated).
    """
    registry = registry or get_registry()
    check_expansion(raw, "recipe (with its --set overrides)")
    recipe = parse_recipe(raw)
    _check_required_plugins(recipe, registry)
    validate_log(recipe.log, registry)

    data_cls = _load_class(registry, "dataset", recipe.data.name, "data.name")
    data_params = validate_params(data_cls.Params, recipe.data.params, "data.params")
    tok_cls = _load_class(registry, "tokenizer", recipe.tokenizer.name, "tokenizer.name")
    tok_params = validate_params(tok_cls.Params, recipe.tokenizer.params, "tokenizer.params")

    if num_levels is None:
        num_levels = _count_levels(tok_cls, tok_params, data_cls, data_params)

    specs, prior_params, backbone_params, sampler_params = [], [], [], []
    for i in range(num_levels):
        spec = recipe.prior.for_level(i, num_levels)
        base = f"prior.levels.{i}" if recipe.prior.levels is not None else "prior"
        prior_cls = _load_class(registry, "prior", spec.name, f"{base}.name")
        bb_cls = _load_class(registry, "backbone", spec.backbone.name, f"{base}.backbone.name")
        prior_params.append(validate_params(prior_cls.Params, spec.params, f"{base}.params"))
        backbone_params.append(validate_params(bb_cls.Params, spec.backbone.params, f"{base}.backbone.params"))
        sampler_params.append(validate_params(prior_cls.SamplerParams, recipe.sample.params, "sample.params"))
        if prior_cls.needs_causal and not bb_cls.supports_causal:
            why = f" ({bb_cls.causal_unsupported_reason})" if bb_cls.causal_unsupported_reason else ""
            causal = [n for n in registry.names("backbone") if getattr(registry.load("backbone", n), "supports_causal", False)]
            raise ConfigError(
                f"{base}: prior '{spec.name}' needs a causal backbone but '{spec.backbone.name}' cannot be "
                f"causal{why}; use one of: {', '.join(causal) or 'none installed'}"
            )
        _check_conditioning(recipe, bb_cls, spec.backbone.name, base, i, data_cls, data_params)
        specs.append(spec)
    _check_sizes(recipe, sampler_params)
    return ResolvedRecipe(recipe, raw, data_params, tok_params, specs, prior_params, backbone_params, sampler_params)


def _check_sizes(recipe: Recipe, sampler_params: list[BaseModel]) -> None:
    """The limits sampling and training would enforce later (genfw.limits), checked before any work."""
    limits.check("samples", recipe.sample.n, "sample.n: the number of samples")
    limits.check("samples", recipe.evaluate.n_samples, "evaluate.n_samples: the number of samples")
    limits.check("batch", recipe.sample.batch_size, "sample.batch_size: the batch size")
    limits.check("batch", recipe.evaluate.batch_size, "evaluate.batch_size: the batch size")
    for stage in ("tokenizer", "prior"):
        limits.check("batch", getattr(recipe.train, stage).batch_size, f"train.{stage}.batch_size: the batch size")
    for sp in sampler_params:  # the same sample.params, with each level's defaults
        limits.check_sampler_steps(sp.model_dump(), "sample.params.")


def _check_conditioning(recipe: Recipe, bb_cls, name: str, base: str, level: int, data_cls, data_params) -> None:
    """A backbone that declares it cannot use labels or coarser grids is refused where they would be given."""
    if level > 0 and not getattr(bb_cls, "uses_context", True):
        raise ConfigError(f"{base}.backbone: '{name}' cannot be conditioned on coarser code grids, which level {level} "
                          "of a hierarchical tokenizer needs; use another backbone for this level")
    if recipe.class_conditional and not getattr(bb_cls, "uses_labels", True):
        try:
            num_classes = data_cls(data_params).num_classes
        except Exception:  # noqa: BLE001 - a dataset that cannot count its classes cheaply: checked at build
            return
        if num_classes:
            raise ConfigError(f"{base}.backbone: '{name}' cannot be conditioned on labels, and the data has "
                              f"{num_classes} classes: set class_conditional: false, or use another backbone")


def _count_levels(tok_cls, tok_params, data_cls, data_params) -> int:
    try:
        data = data_cls(data_params)
        channels, resolution = data.channels, list(data.resolution)
    except GenfwError:
        raise
    except Exception:  # noqa: BLE001 - a dataset that cannot describe itself cheaply
        channels, resolution = 3, [256, 256]
    import torch

    try:
        with torch.device("meta"):
            tok = tok_cls(tok_params, channels=channels, resolution=resolution)
        return len(tok.levels)
    except GenfwError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tokenizer '{tok_cls.__name__}' cannot be built with these params: "
                          f"{type(e).__name__}: {e}") from None


def _check_required_plugins(recipe: Recipe, registry: Registry) -> None:
    if not recipe.plugins:
        return
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    installed = registry.distributions()
    for dist, spec in recipe.plugins.items():
        if dist not in installed:
            broken = registry.broken_hint(dist)
            if broken:
                raise ConfigError(f"recipe needs plugin distribution '{dist}' {spec}, which is installed but failed to "
                                  f"load{broken}")
            raise ConfigError(f"recipe needs plugin distribution '{dist}' {spec}, which is not installed: pip install '{dist}{spec}'")
        try:
            ok = installed[dist] in SpecifierSet(spec)
        except InvalidSpecifier:
            raise ConfigError(f"plugins.{dist}: invalid version specifier '{spec}'") from None
        if not ok:
            raise ConfigError(f"recipe needs {dist}{spec} but {installed[dist]} is installed: pip install '{dist}{spec}'")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                registry: Registry | None = None, notes: list[str] | None = None) -> ResolvedRecipe:
    """Read, override and validate a recipe file (override notes are appended to ``notes``)."""
    raw = apply_overrides(load_yaml(path), overrides, notes)
    return validate_recipe(raw, registry)
