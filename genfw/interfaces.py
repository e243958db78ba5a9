"""The base class of every plugin kind — Tokenizer, Backbone, Prior, ImageDataset, Logger, Converter —
and their data types. The registry knows kinds by name; their contracts are here, and nothing here
knows an implementation.

Every component is an ``nn.Module`` built as ``cls(params, **construct)``:

* ``params`` is an instance of the class's own pydantic ``Params`` model (what a recipe writes),
* ``construct`` are keyword arguments the pipeline derives (image channels, grid size,
  vocabulary...). Both are recorded in checkpoints, so ``genfw.load`` can rebuild the module from
  the file alone. Each base class takes its standard construction arguments keyword-only,
  normalises them to JSON values, stores them in ``self.construct`` and exposes them as
  properties (``Tokenizer.channels``, ``Backbone.grid``, ``Prior.codebook_size``...): a
  component's ``__init__(self, params=None, **construct)`` passes them on with
  ``super().__init__(params, **construct)`` and converts nothing.

Conventions: images ``[B, C, H, W]`` float in [-1, 1]; codes ``list[LongTensor[B, h, w]]``, one
grid per tokenizer level, coarsest first; labels ``LongTensor[B]`` or None; context for a lower
level of a hierarchy is the list of coarser code grids.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn

from genfw.errors import ConfigError
from genfw.params import NoParams, Params, validate_params
from genfw.params import validated as _validated
from genfw.registry import KINDS, build_backbone  # noqa: F401 - KINDS re-exported

# --------------------------------------------------------------------------------------------
# data types


@dataclass(frozen=True)
class Level:
    """One level of a tokenizer: ``codebook_size`` codes, grid = image size // ``factor``."""

    codebook_size: int
    factor: int


class ContextSpec(NamedTuple):
    """A coarser code grid a backbone is conditioned on: its vocabulary and grid shape."""

    vocab_size: int
    height: int
    width: int


def _pair(value: Any, what: str) -> list[int]:
    """``int`` or ``[H, W]`` -> ``[H, W]`` of ints."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [int(value), int(value)]
    try:
        h, w = value
        return [int(h), int(w)]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an int or [height, width], got {value!r}") from None


def _context(value: Any) -> list[list[int]]:
    """Context specs (sequences or ContextSpec) -> ``[[vocab, h, w], ...]`` of ints."""
    out = []
    for item in value or ():
        try:
            v, h, w = item
        except (TypeError, ValueError):
            raise ConfigError(f"a context entry must be [vocab_size, height, width], got {item!r}") from None
        out.append([int(v), int(h), int(w)])
    return out


@dataclass
class StepOutput:
    """What a training step returns: one scalar loss per parameter group, plus float logs."""

    losses: dict[str, torch.Tensor]
    logs: dict[str, float] = field(default_factory=dict)


#: What a prior's ``nll`` value is (see docs/evaluation.md, "Likelihood kinds"):
#: ``exact`` — the model's negative log-likelihood (chain rule);
#: ``bound`` — an upper bound on it (an ELBO), estimated without bias (Monte Carlo);
#: ``estimate`` — an approximation of a bound whose error has no known sign (e.g. quadrature
#: over fewer timesteps), reported with an estimate of that error;
#: ``not_likelihood`` — a training loss in bits that neither is nor bounds a likelihood
#: (SUNDAE's denoising cross-entropy): comparable across models of that prior only.
NLLKind = Literal["exact", "bound", "estimate", "not_likelihood"]
NLL_KINDS: tuple[str, ...] = ("exact", "bound", "estimate", "not_likelihood")


@dataclass
class NLLOutput:
    """Per-sample value in bits per token and what it is (:data:`NLLKind`).

    ``error_bits_per_token`` (optional, [B]): for an ``estimate``, a per-sample estimate of its
    approximation error (e.g. the difference from a coarser quadrature).
    """

    bits_per_token: torch.Tensor  # [B]
    kind: NLLKind
    error_bits_per_token: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# components


class Component(nn.Module):
    """Common base: the ``Params`` model, construction args, and a generic training step."""

    kind: ClassVar[str] = "component"
    Params: ClassVar[type[Params]] = NoParams

    def __init__(self, params: Params | dict | None = None, **construct: Any) -> None:
        super().__init__()
        self.params = _validated(self.Params, params)
        self.construct = dict(construct)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups, each trained by its own optimizer (most components have one)."""
        return {"main": [p for p in self.parameters() if p.requires_grad]}


class Tokenizer(Component, abc.ABC):
    """Compresses images to code grids and back.

    Constructed with ``channels`` (1 or 3) and ``resolution`` (int, or [H, W]: the training
    image size), stored as ``construct = {"channels": C, "resolution": [H, W]}`` and exposed as
    :attr:`channels` and :attr:`resolution`.
    """

    kind: ClassVar[str] = "tokenizer"
    #: False for tokenizers with nothing to learn (e.g. ``pixels``): the train stage is skipped.
    trainable: ClassVar[bool] = True

    def __init__(self, params: Params | dict | None = None, *, channels: int, resolution: int | list[int],
                 **construct: Any) -> None:
        super().__init__(params, channels=int(channels), resolution=_pair(resolution, "resolution"), **construct)
        if self.channels < 1:
            raise ConfigError(f"{type(self).__name__}: channels must be >= 1, got {self.channels}")

    @property
    def channels(self) -> int:
        """Image channels C."""
        return int(self.construct["channels"])

    @property
    def resolution(self) -> tuple[int, int]:
        """Training image size (H, W)."""
        h, w = self.construct["resolution"]
        return int(h), int(w)

    @property
    @abc.abstractmethod
    def levels(self) -> list[Level]:
        """Codebook size and downsampling factor per level, coarsest first."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, C, H, W] in [-1, 1] -> codes, one LongTensor[B, h, w] per level."""

    @abc.abstractmethod
    def decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Codes (coarsest first) -> images [B, C, H, W] in [-1, 1]."""

    def training_step(self, images: torch.Tensor, step: int) -> StepOutput:
        """One step's losses, one per parameter group in :meth:`param_groups`."""
        raise NotImplementedError(f"{type(self).__name__} is not trainable")

    def grid_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Code grid (h, w) per level for an image of the given size."""
        return [(height // lv.factor, width // lv.factor) for lv in self.levels]

    @torch.no_grad()
    def codebook_stats(self, codes: list[torch.Tensor]) -> dict[str, float]:
        """Perplexity and usage of each level's codebook over a batch of codes."""
        out: dict[str, float] = {}
        for i, (c, lv) in enumerate(zip(codes, self.levels)):
            counts = torch.bincount(c.flatten().cpu(), minlength=lv.codebook_size).double()
            p = counts / counts.sum().clamp_min(1)
            entropy = -(p[p > 0] * p[p > 0].log()).sum()
            out[f"level{i}/perplexity"] = float(entropy.exp())
            out[f"level{i}/usage"] = float((counts > 0).double().mean())
        return out


class Backbone(Component, abc.ABC):
    """Maps a token grid to logits over a vocabulary.

    Constructed by a prior with:
      ``vocab_size``   input vocabulary (codebook plus any special tokens),
      ``out_size``     number of output classes (usually the codebook size),
      ``grid``         [h, w] of the training grid,
      ``num_classes``  label classes for conditioning (0 = unconditional),
      ``context``      list of [vocab, h, w] for coarser levels it is conditioned on.
    """

    kind: ClassVar[str] = "backbone"
    #: Whether ``causal=True`` is honoured (autoregressive priors need it).
    supports_causal: ClassVar[bool] = False
    #: Why not, shown in the recipe validation error when an AR prior picks this backbone.
    causal_unsupported_reason: ClassVar[str] = ""
    #: Whether labels condition the output (``check_backbone`` verifies it); a backbone that
    #: cannot use them sets False and refuses ``num_classes > 0``.
    uses_labels: ClassVar[bool] = True
    #: Whether coarser code grids condition the output (hierarchical tokenizers need it).
    uses_context: ClassVar[bool] = True

    def __init__(self, params: Params | dict | None = None, *, vocab_size: int, out_size: int,
                 grid: int | list[int], num_classes: int = 0, context: list[list[int]] | None = None,
                 **construct: Any) -> None:
        super().__init__(params, vocab_size=int(vocab_size), out_size=int(out_size), grid=_pair(grid, "grid"),
                         num_classes=int(num_classes or 0), context=_context(context), **construct)
        name = type(self).__name__
        if self.num_classes and not self.uses_labels:
            raise ConfigError(f"backbone {name} cannot be conditioned on labels ({self.num_classes} classes): "
                              "set class_conditional: false in the recipe, or use another backbone")
        if self.context and not self.uses_context:
            raise ConfigError(f"backbone {name} cannot be conditioned on coarser code grids: it cannot model "
                              "the lower levels of a hierarchical tokenizer; use another backbone")

    @property
    def vocab_size(self) -> int:
        """Input vocabulary: codebook plus any special tokens of the prior."""
        return int(self.construct["vocab_size"])

    @property
    def out_size(self) -> int:
        """Number of output logits per position."""
        return int(self.construct["out_size"])

    @property
    def grid(self) -> tuple[int, int]:
        """Training grid (h, w)."""
        h, w = self.construct["grid"]
        return int(h), int(w)

    @property
    def num_classes(self) -> int:
        """Label classes (0 = unconditional)."""
        return int(self.construct.get("num_classes", 0) or 0)

    @property
    def context(self) -> list[ContextSpec]:
        """The coarser code grids this backbone is conditioned on, coarsest first."""
        return [ContextSpec(*c) for c in self.construct.get("context") or []]

    @abc.abstractmethod
    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        context: list[torch.Tensor] | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """tokens [B, h, w] -> logits [B, h, w, out_size]."""

    # --- incremental decoding (causal backbones only) --------------------------------------

    def init_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        """An empty key/value cache for :meth:`decode_step`."""
        raise NotImplementedError(f"{type(self).__name__} has no key/value cache")

    def decode_step(
        self,
        token: torch.Tensor,
        position: int,
        cache: Any,
        labels: torch.Tensor | None = None,
        context: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Feed the token [B] at raster ``position``; return logits [B, out_size] predicting
        the *same* position's output (as ``forward(causal=True)`` would there).

        The caller implements the shift: to predict position i it feeds the token at i-1
        (or the start token) — see the autoregressive prior.
        """
        raise NotImplementedError(f"{type(self).__name__} has no key/value cache")


class Prior(Component, abc.ABC):
    """A generative model over one level's code grid.

    Constructed by the pipeline with:
      ``codebook_size`` K, ``grid`` [h, w], ``num_classes`` (0 = unconditional),
      ``context`` list of [vocab, h, w] of the coarser levels this level is conditioned on,
      ``backbone`` {"name": ..., "params": {...}} — the prior builds it through the registry
      with :func:`genfw.registry.build_backbone` and the vocabulary it needs.
    """

    kind: ClassVar[str] = "prior"
    #: Validated sampler parameters (a recipe's ``sample.params``).
    SamplerParams: ClassVar[type[Params]] = NoParams
    #: Whether the prior needs a causal backbone.
    needs_causal: ClassVar[bool] = False
    #: What :meth:`nll` returns (:data:`NLLKind`); a prior whose kind depends on its params
    #: overrides this with a property.
    nll_kind: ClassVar[NLLKind] = "bound"

    @abc.abstractmethod
    def loss(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        context: list[torch.Tensor] | None = None,
    ) -> StepOutput:
        """Training loss on codes [B, h, w]; ``losses['main']`` is minimised."""

    @abc.abstractmethod
    def sample(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        context: list[torch.Tensor] | None = None,
        init: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        params: Params | None = None,
        grid: tuple[int, int] | None = None,
        **overrides: Any,
    ) -> torch.Tensor:
        """Draw ``n`` code grids [n, h, w].

        ``init``/``mask`` (both [n, h, w]) inpaint: only positions where ``mask`` is True are
        regenerated, the rest of ``init`` is returned unchanged. ``params`` is a
        ``SamplerParams`` instance; keyword ``overrides`` replace its fields. ``grid`` asks for
        a grid other than the training one where the prior supports it.
        """

    @abc.abstractmethod
    def nll(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        context: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> NLLOutput:
        """Per-sample negative log-likelihood (bits per token), of the kind ``nll_kind`` says."""

    def __init__(self, params: Params | dict | None = None, *, codebook_size: int, grid: int | list[int],
                 num_classes: int = 0, context: list[list[int]] | None = None, backbone: Any = None,
                 **construct: Any) -> None:
        if hasattr(backbone, "model_dump"):
            backbone = backbone.model_dump()
        if backbone is not None:
            backbone = {"name": backbone["name"], "params": dict(backbone.get("params") or {})}
        super().__init__(params, codebook_size=int(codebook_size), grid=_pair(grid, "grid"),
                         num_classes=int(num_classes or 0), context=_context(context),
                         backbone=backbone, **construct)

    def make_backbone(self, vocab_size: int, out_size: int | None = None, num_classes: int | None = None) -> Backbone:
        """Build this prior's backbone (from its ``backbone`` spec) with the vocabulary it needs.

        The spec kept in ``construct`` (and so in checkpoints) is then the backbone's fully
        validated params, defaults filled in: a later change of a default cannot change a saved
        model.
        """
        spec = self.construct.get("backbone")
        if spec is None:
            raise ConfigError(f"{type(self).__name__} was built without a backbone spec")
        backbone = build_backbone(spec, vocab_size=vocab_size,
                                  out_size=self.codebook_size if out_size is None else out_size,
                                  grid=list(self.grid), num_classes=self.num_classes if num_classes is None else num_classes,
                                  context=self.construct["context"])
        spec["params"] = backbone.params.model_dump(mode="json")
        return backbone

    def training_step(self, batch: dict[str, Any], step: int) -> StepOutput:
        """``batch`` holds ``codes`` [B, h, w], optional ``labels`` and ``context``."""
        return self.loss(batch["codes"], batch.get("labels"), batch.get("context"))

    def sampler_params(self, params: Params | dict | None = None, **overrides: Any) -> Params:
        """Validate sampler params (a model, a dict or None) with keyword overrides applied."""
        if params is None:
            base: dict[str, Any] = {}
        elif isinstance(params, BaseModel):
            base = params.model_dump()
        else:
            base = dict(params)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return validate_params(self.SamplerParams, base, "sampler params")

    @property
    def codebook_size(self) -> int:
        """K, the codebook size of this level."""
        return int(self.construct["codebook_size"])

    @property
    def grid(self) -> tuple[int, int]:
        """Training grid (h, w)."""
        h, w = self.construct["grid"]
        return int(h), int(w)

    @property
    def num_classes(self) -> int:
        return int(self.construct.get("num_classes", 0) or 0)

    @property
    def context(self) -> list[ContextSpec]:
        """The coarser code grids this level is conditioned on, coarsest first."""
        return [ContextSpec(*c) for c in self.construct.get("context") or []]


class ImageDataset(abc.ABC):
    """A dataset component: indexable, yields ``(image [C, H, W] in [-1, 1], label or -1)``.

    Built as ``cls(params)``; ``channels``, ``resolution`` and ``class_names`` describe it.
    """

    kind: ClassVar[str] = "dataset"
    Params: ClassVar[type[Params]] = NoParams

    def __init__(self, params: Params | dict | None = None) -> None:
        self.params = _validated(self.Params, params)

    @property
    @abc.abstractmethod
    def channels(self) -> int: ...

    @property
    @abc.abstractmethod
    def resolution(self) -> tuple[int, int]: ...

    @property
    def class_names(self) -> list[str]:
        return []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class Logger(abc.ABC):
    """A sink for training scalars and images (the ``logger`` component kind)."""

    kind: ClassVar[str] = "logger"
    Params: ClassVar[type[Params]] = NoParams

    def __init__(self, params: Params | dict | None = None, *, directory: str, stage: str = "",
                 start_step: int = 0) -> None:
        self.params = _validated(self.Params, params)
        self.directory, self.stage, self.start_step = directory, stage, int(start_step)

    @classmethod  # noqa: B027 - optional
    def check_available(cls) -> None:
        """Raise a ``PluginError`` saying what to install when a dependency is missing.

        Called when a recipe is validated, so a missing package fails before any work starts.
        """

    @abc.abstractmethod
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (tag -> value; tags like ``loss/main``, ``lr``) at ``step``."""

    def log_image(self, step: int, tag: str, image: torch.Tensor) -> None:  # noqa: B027 - optional
        """Record an image (uint8 ``[C, H, W]`` on the CPU, C = 1 or 3); ignored by default."""

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:  # noqa: B027 - optional
        """Record a run's hyper-parameters (flat ``a.b.c`` keys; numbers, text, booleans) with its
        evaluation metrics; ignored by default (the evaluate stage calls it once)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Flush and release files; called once at the end of the stage (also on errors)."""


@runtime_checkable
class Converter(Protocol):
    """The ``converter`` kind: a function ``(src, out, *, options...) -> module`` that reads another
    project's checkpoint at ``src``, writes a genfw checkpoint at ``out`` and returns the module.

    It takes the ``genfw convert`` options it declares as keyword arguments (``config``, ``preset``,
    ``resolution``, and ``params`` or ``overrides`` for ``--set``) and may carry a pydantic
    ``Params`` attribute that validates ``--set`` (docs/writing-plugins.md, "Converters"). The helpers
    it builds on are in :mod:`genfw.convert`.
    """

    def __call__(self, src: str | os.PathLike, out: str | os.PathLike, /, **options: Any) -> nn.Module: ...
