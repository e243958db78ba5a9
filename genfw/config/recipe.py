"""The recipe schema: pydantic models of every section a recipe may hold, unknown keys refused.

Components are named here, not validated: their params are checked against the registered
component's own ``Params`` by :mod:`genfw.config.validate`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genfw import limits
from genfw.errors import ConfigError
from genfw.params import format_validation_error


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
