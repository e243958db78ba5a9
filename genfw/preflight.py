"""Pre-flight checks: does this machine have what a validated recipe needs, before any stage runs?

A recipe can be valid and still unable to run here: its data folder is elsewhere, the LPIPS or
Inception weights were never put in the torch hub cache, it asks for CUDA on a laptop, or it
asks ``torch.compile`` for CPU kernels without a C++ compiler. Each check gives one line: what is
missing and the short fix.

``genfw run`` (and ``--dry-run``) stop on any failed check before the first stage writes a file;
``genfw validate`` prints them as "not ready on this machine" and still exits 0 when the recipe
itself is valid (``--strict`` makes them errors), so a paper recipe meant for a GPU box with the
data on disk can be validated anywhere.

Components add their own checks with an optional classmethod ``preflight(params) -> list[str]``
(e.g. VQ-GAN: LPIPS weights when ``perceptual_weight > 0``), called only when the component
will be trained.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import torch

from genfw.config import ResolvedRecipe
from genfw.data import split_halves, split_indices
from genfw.errors import GenfwError
from genfw.pipeline import STAGES
from genfw.registry import get_registry


@dataclass
class Check:
    name: str  # "device", "data", "tokenizer", "evaluate", "compile"
    ok: bool
    message: str


class PreflightError(GenfwError):
    """One or more pre-flight checks failed: one line per failed check."""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, message: str) -> None:
        self.checks.append(Check(name, ok, message))

    def raise_if_failed(self) -> None:
        if self.failed:
            raise PreflightError("\n".join(f"{c.name}: {c.message}" for c in self.failed))


def check_device(name: str | None) -> str | None:
    """None when ``name`` (auto, cpu, cuda, cuda:N, mps) is usable here, else what is wrong."""
    if name in (None, "", "auto"):
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"'{name}' is not a device: use auto, cpu, cuda or cuda:N"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"device '{name}' requested but CUDA is not available here: set device=cpu (or auto)"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"device '{name}' requested but this machine has {count} CUDA device(s): use cuda:0..cuda:{count - 1}"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"device '{name}' requested but MPS is not available here: set device=cpu (or auto)"
    elif device.type not in ("cpu", "cuda", "mps"):
        return f"device '{name}' is not supported: use auto, cpu, cuda or cuda:N"
    return None


def preflight(resolved: ResolvedRecipe, device: str | torch.device | None = None,
              stages: list[str] | None = None) -> Report:
    """Check the data, weights, device and compiler a recipe needs on this machine (seconds)."""
    recipe = resolved.recipe
    wanted = set(stages or STAGES)
    report = Report()
    registry = get_registry()

    requested = str(device) if device is not None else recipe.device
    problem = check_device(requested)
    device_type = "cpu" if problem else _device_type(requested)
    where = f"{requested} -> {device_type}" if requested in (None, "", "auto") else str(requested)
    report.add("device", problem is None, problem or f"{where} is available")

    # data: exists, and holds images (counted); reading every image is left to the stages
    num_classes, count = 0, 0
    data_ok = False
    try:
        dataset = registry.build("dataset", recipe.data.name, resolved.data_params)
        count = len(dataset)
        if count == 0:
            raise GenfwError(f"dataset '{recipe.data.name}' is empty")
        num_classes = dataset.num_classes
        classes = f", {num_classes} classes" if num_classes else ""
        report.add("data", True, f"{count:,} images ({recipe.data.name}{classes})")
        data_ok = True
    except GenfwError as e:
        report.add("data", False, str(e))

    # components trained here may need files (e.g. LPIPS weights for VQ-GAN's perceptual loss)
    tok = recipe.tokenizer
    if "tokenizer" in wanted and not tok.checkpoint and recipe.train.tokenizer.steps > 0:
        cls = registry.load("tokenizer", tok.name)
        hook = getattr(cls, "preflight", None)
        problems = list(hook(resolved.tokenizer_params)) if callable(hook) else []
        report.add("tokenizer", not problems, "; ".join(problems) or f"'{tok.name}' has what training needs")

    # evaluation: Inception weights when the fidelity metrics will use them. Which extractor that is
    # depends on the data's labels: without data it is unknown, and the data's own line says it all.
    if "evaluate" in wanted and "fidelity" in recipe.evaluate.metrics and data_ok:
        spec = recipe.evaluate
        resolution = getattr(resolved.data_params, "resolution", None) or 256
        try:
            # late: start-up time (genfw.metrics loads torch-fidelity, ~1 s)
            from genfw import metrics

            chosen = metrics.choose_extractor(spec.feature_extractor, has_labels=num_classes > 0,
                                              resolution=resolution, inception_weights_path=spec.inception_weights)
            report.add("evaluate", True, f"fidelity features: {chosen}")
        except GenfwError as e:
            report.add("evaluate", False, str(e))
        if count:
            report.add(*_reference_check(resolved, count))

    # torch.compile: Inductor needs a C++ compiler for CPU kernels
    compiled = [s for s, t in (("tokenizer", recipe.train.tokenizer), ("prior", recipe.train.prior)) if t.compile]
    if compiled:
        has_cc = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
        ok = device_type != "cpu" or has_cc
        report.add("compile", ok, f"train.{compiled[0]}.compile=true on CPU needs a C++ compiler (none on PATH): "
                   f"install g++ or set train.{compiled[0]}.compile=false" if not ok else "torch.compile available")
    return report


def _reference_check(resolved: ResolvedRecipe, count: int) -> tuple[str, bool, str]:
    """The fidelity reference: the chosen held-out half must hold more than PRDC's k images."""
    recipe = resolved.recipe
    spec = recipe.evaluate
    validation, test = split_halves(split_indices(count, recipe.latents.holdout, recipe.seed)[1], recipe.seed)
    halves = {"validation": validation, "test": test}
    chosen = len(halves[spec.reference])
    # late: start-up time (genfw.metrics loads torch-fidelity, ~1 s)
    from genfw.evaluate import PRDC_K

    if min(len(validation), len(test)) <= PRDC_K:
        return ("reference", False, f"the fidelity metrics need more than {PRDC_K} held-out images in each half "
                f"(reference and floor), latents.holdout gives {len(validation) + len(test)} in all: "
                "raise latents.holdout")
    used = min(chosen, spec.n_samples)
    short = f" (fewer than n_samples {spec.n_samples}: all of the half)" if chosen < spec.n_samples else ""
    return ("reference", True, f"{used} held-out {spec.reference} images{short}")


def _device_type(name: str | None) -> str:
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type
