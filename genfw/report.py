"""The run report: a short markdown file with the recipe, sizes, curves, samples, metrics and timings."""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from genfw import __version__, checkpoint, io
from genfw.context import RunContext as Run
from genfw.context import count_parameters
from genfw.registry import get_registry


def read_log(path: str) -> list[dict[str, Any]]:
    """Records of a trainer's ``log.jsonl`` (missing file -> empty)."""
    if not os.path.exists(path):
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            # a resumed run logs the steps after its last checkpoint again: keep the latest
            by_step[record.get("step")] = record
    return list(by_step.values())


def curve_groups(records: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Every numeric scalar of a log, grouped: ``loss/vq`` -> group ``loss``; ``lr`` -> ``lr``."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    keys = sorted({k for r in records for k, v in r.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys:
        pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        if pts:
            group, _, name = key.partition("/")
            groups.setdefault(group, {})[name or group] = pts
    return groups


def plot_curves(logs: dict[str, list[dict[str, Any]]], target: str) -> bool:
    """Curves of every logged scalar of every trained stage: one panel per (stage, group).

    Keys sharing a prefix (``loss/generator``, ``loss/discriminator``) share a panel; positive
    series over more than a decade get a log axis. False when there is nothing to plot.
    """
    panels = [(stage, group, series) for stage, records in logs.items()
              for group, series in curve_groups(records).items()]
    if not panels:
        return False
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (stage, group, series) in zip(axes.flat, panels):
        values = []
        for name, pts in series.items():
            ax.plot(*zip(*pts), label=name if name != group else None)
            values += [v for _, v in pts]
        ax.set_title(f"{stage}: {group}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, target)
    return True


def _save_figure(fig, target: str) -> None:
    import io as _io

    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    io.write_bytes(target, buf.getvalue())


def plot_labelled_samples(images, labels, class_names: list[str], target: str, columns: int | None = None) -> bool:
    """The samples in a grid whose columns are titled by class (when each column holds one class)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid as tv_grid

    n = images.shape[0]
    if columns is None and labels is not None:
        distinct = len(set(labels.tolist()))
        columns = distinct if distinct > 1 else None
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    pad = 2
    grid = tv_grid(((images.float().clamp(-1, 1) + 1) / 2), nrow=columns, padding=pad, pad_value=1.0)
    h, w = images.shape[-2:]
    fig_w = min(16, max(4, columns * 0.9))
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * grid.shape[1] / grid.shape[2] + 0.4))
    ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if images.shape[1] == 1 else None, vmin=0, vmax=1)
    ax.set_yticks([])
    titles = None
    if labels is not None:
        by_col = [sorted({int(labels[i]) for i in range(c, n, columns)}) for c in range(columns)]
        if all(len(c) == 1 for c in by_col):
            titles = [class_names[c[0]] if c[0] < len(class_names) else str(c[0]) for c in by_col]
    if titles:
        ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(columns)], titles, fontsize=8)
        ax.xaxis.tick_top()
        ax.set_xlabel("class asked for", fontsize=8)
        ax.xaxis.set_label_position("top")
    else:
        ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout()
    _save_figure(fig, target)
    return True


def _read_samples(folder: str, limit: int = 256):
    """The sample PNGs (at most ``limit``) as [N, C, H, W] in [-1, 1] and their labels, or (None, None)."""
    import numpy as np
    import torch
    from PIL import Image

    if not os.path.isdir(folder):
        return None, None
    names = sorted(f for f in os.listdir(folder) if f.endswith(".png") and f[:5].isdigit())[:limit]
    if not names:
        return None, None
    arrays = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as img:
            arr = np.asarray(img, dtype=np.float32)
        arrays.append(arr[:, :, None] if arr.ndim == 2 else arr)
    if len({a.shape for a in arrays}) != 1:
        return None, None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
    labels = None
    codes = os.path.join(folder, "codes.safetensors")
    if os.path.exists(codes):
        with checkpoint.Reader(codes) as reader:
            if "labels" in reader:
                labels = reader.get("labels")[: len(names)]
    return images, labels


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# Entries of metrics.json that describe how a number was computed, not a measurement.
SETTING_KEYS = {"num_samples", "num_reference", "batch_size", "prdc_k", "feature_dim", "kid_subsets",
                "kid_subset_size", "feature_extractor", "feature_extractor_id", "device", "nll_kind",
                "num_tokens", "num_samples_nll", "seed", "kind", "floor_num_samples", "num_heldout"}


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(measurements, settings): strings and the known setting names are settings."""
    values, settings = {}, {}
    for k, v in _flatten(metrics).items():
        leaf = k.rsplit("/", 1)[-1]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or leaf in SETTING_KEYS or leaf.endswith("_kind"):
            settings[k] = v
        else:
            values[k] = v
    return values, settings


#: A McNemar p below this flags the two classifiers' class accuracies as disagreeing (genfw.evaluate).
DISAGREEMENT_P = 0.05


def context_lines(metrics: dict[str, Any]) -> list[str]:
    """What FID and class accuracy are to be read against: the real-vs-real floor and the
    tokenizer's reconstruction FID; each classifier's held-out accuracy and calibration, and a
    warning when the two classifiers disagree about the samples by more than chance."""
    m = metrics
    lines: list[str] = []
    if isinstance(m.get("fidelity/fid"), (int, float)):
        n, ref = m.get("fidelity/num_samples"), m.get("fidelity/num_reference")
        half = m.get("fidelity/reference", "held-out")
        line = f"FID {_fmt(m['fidelity/fid'])} ({n} samples against {ref} held-out {half} images)"
        if "fidelity/floor_fid" in m:
            line += (f"; real-vs-real floor {_fmt(m['fidelity/floor_fid'])} ({m.get('fidelity/floor_num_samples')} "
                     "real images of the other held-out half against the same reference)")
        if "fidelity/reconstruction_fid" in m:
            line += f"; the tokenizer's reconstructions of the reference: {_fmt(m['fidelity/reconstruction_fid'])}"
        lines.append(line + ".")
        if "fidelity/floor_kid" in m:
            lines.append(f"KID {_fmt(m.get('fidelity/kid'))}; floor {_fmt(m['fidelity/floor_kid'])}; "
                         f"reconstructions {_fmt(m.get('fidelity/reconstruction_kid'))}.")
        if isinstance(n, int) and isinstance(ref, int) and ref < n:
            lines.append(f"The reference half holds {ref} images, fewer than the {n} samples: FIDs compare only at "
                         "these counts (raise latents.holdout for a larger reference).")
    for prefix, key in (("classifier", "class_accuracy"), ("classifier2", "classifier2/class_accuracy")):
        if isinstance(m.get(key), (int, float)):
            held = ""
            if f"{prefix}/heldout_accuracy" in m:
                held = (f" (its accuracy on {m.get(f'{prefix}/num_heldout')} held-out real images "
                        f"{_fmt(m[f'{prefix}/heldout_accuracy'])}, calibration error ECE "
                        f"{_fmt(m.get(f'{prefix}/heldout_ece'))})")
            lines.append(f"Class accuracy {_fmt(m[key])} by the {m.get(f'{prefix}/arch', '')} classifier{held}.")
    p = m.get("classifier/disagreement_p")
    if isinstance(p, (int, float)) and p < DISAGREEMENT_P:
        lines.append(f"**Warning:** the two classifiers' class accuracies differ by more than chance "
                     f"(exact McNemar p = {p:.2g}): class accuracy depends on which classifier judges.")
    return [*(f"{line}\n" for line in lines)] if lines else []


def _versions() -> list[str]:
    import platform

    import torch

    out = [f"genfw {__version__}", f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    try:
        dists = sorted({(e.dist, e.version) for e in get_registry().entries() if e.dist != "genfw"})
        out += [f"{d} {v}" for d, v in dists]
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return out


def write_report(run: Run, tokenizer, priors) -> None:
    """Write ``report.md`` (and ``curves.png``, ``samples.png``) into the run directory."""
    import datetime
    import shlex
    import sys

    lines = [f"# {run.recipe.name}", ""]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    program = "genfw" if program in ("__main__.py", "genfw") else program  # python -m genfw
    command = " ".join(shlex.quote(a) for a in [program, *sys.argv[1:]])
    lines += [f"Written {now} by `{command}`, on {run.device}.", "",
              "Versions: " + ", ".join(_versions()) + ".", ""]
    lines += ["## Models", "", "| component | name | parameters |", "|---|---|---|"]
    lines.append(f"| tokenizer | {run.recipe.tokenizer.name} | {count_parameters(tokenizer):,} |")
    for i, prior in enumerate(priors or []):
        spec = run.resolved.prior_specs[i]
        lines.append(f"| prior level {i} | {spec.name} on {spec.backbone.name} | {count_parameters(prior):,} |")
    lines.append("")
    logs = {}
    for stage in ["tokenizer"] + [f"prior{i}" for i in range(len(priors or []))]:
        records = read_log(run.path(stage, "log.jsonl"))
        if records:
            logs[stage] = records
    if plot_curves(logs, run.path("curves.png")):
        lines += ["## Training curves", "", "Every logged scalar, one panel per stage and group.", "",
                  "![training curves](curves.png)", ""]
    images, labels = _read_samples(run.path("samples"))
    if images is not None:
        class_names = run.dataset.class_names if labels is not None else []
        plot_labelled_samples(images, labels, class_names, run.path("samples.png"), run.recipe.sample.grid_columns)
        lines += ["## Samples", "", "![samples](samples.png)", "",
                  f"{images.shape[0]} samples; columns are titled by the class asked for when each column holds "
                  "one class. Every sample is a PNG in `samples/` (all in one image: `samples/grid.png`).", ""]
    if os.path.exists(run.path("metrics.json")):
        metrics = io.read_json(run.path("metrics.json"))
        values, settings = split_metrics(metrics)
        if values:
            lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in values.items()]
            lines.append("")
        lines += context_lines(metrics)
        if settings:
            lines += ["### How they were computed", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in settings.items()]
            lines.append("")

        kinds = sorted({v for k, v in metrics.items() if k.endswith("/nll_kind") and isinstance(v, str)})
        # late: start-up time (genfw.metrics loads torch-fidelity, ~1 s)
        from genfw.metrics import NLL_KIND_LABELS

        lines += [f"`nll_kind` {k}: {NLL_KIND_LABELS.get(k, k)} (docs/evaluation.md)." for k in kinds]
        lines += [""] if kinds else []
    timings = {}
    for stage in ["tokenizer", "latents"] + [f"prior{i}" for i in range(len(priors or []))] + ["samples", "evaluate"]:
        try:
            timings[stage] = io.read_json(run.path(stage, "stage.json")).get("seconds", 0.0)
        except FileNotFoundError:
            pass
    if timings:
        lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        lines += ["", f"Device: {run.device}", ""]
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(run.resolved.raw, sort_keys=False).rstrip(), "```", ""]
    io.write_text(run.path("report.md"), "\n".join(lines))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out
