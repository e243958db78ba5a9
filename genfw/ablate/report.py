"""Writing an ablation's comparison: comparison.md, the CSVs, the bar chart, the sweep; the terminal's rows.

Markdown and CSV tables, figures (matplotlib, imported only when one is drawn) and the rows
``genfw ablate`` prints. The numbers come from :mod:`genfw.ablate.stats` and
:mod:`genfw.ablate.columns`; nothing here runs a model.
"""

from __future__ import annotations

import csv
import io as _io
import os
from typing import Any

from genfw import io
from genfw.ablate.columns import COST_COLUMNS, Column, _values, expand_kinds, pick_primary, table_columns
from genfw.ablate.stats import ALPHA, _holm, _seed_items, _tests, cell, significance
from genfw.report import DISAGREEMENT_P, _fmt
from genfw.stats import MIN_SEEDS_FOR_T


def _tests_markdown(tests: list[dict[str, Any]], with_at: bool = False) -> list[str]:
    md = ["Paired designs (the same trained prior at every seed, other sampler settings): paired t-test "
          "and exact sign-flip permutation test over the per-seed differences, the larger p decides. "
          "Independently trained priors: Welch's t-test. Two-sided; Holm's correction over the "
          f"{len(tests)} test{'s' if len(tests) != 1 else ''} of this table at {ALPHA}; "
          "difference = first - second.", ""]
    head = ["pair"] + (["steps"] if with_at else []) + ["design", "difference", "t (df)", "p (t)",
                                                        "p (sign-flip)", "Holm-adjusted p", "verdict"]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tests:
        verdict = "significant after Holm" if t["significant"] else "not significant"
        flip = f"{t['p_sign_flip']:.3g}" if t["p_sign_flip"] is not None else "—"
        design = f"paired, {t['n']} seeds" if t["design"] == "paired" else "independent (Welch)"
        cells = [f"{t['a']} vs {t['b']}"] + ([str(t["at"])] if with_at else []) + [
            design, f"{t['difference']:.4g}", f"{t['t']:.3g} ({t['df']:.3g})", f"{t['p_t']:.3g}", flip,
            f"{t['p_holm']:.3g}", verdict]
        md.append("| " + " | ".join(cells) + " |")
    return md


SAMPLERS_TEXT = {
    "tuned on validation, reported on test": "each combination's sampler settings were tuned on the validation "
    "reference (a grid over the `tune:` settings; the one with the lowest FID, or highest accuracy, as mean "
    "over seeds on the primary metric, on samples drawn for tuning only) and are reported here on fresh samples against the disjoint test reference",
    "frontier": "compared along a frontier: quality against counted sampling FLOPs and seconds per image at "
    "each step count (see below)",
    "as set per combination": "not matched (no `tune:` or `sweep:`): each combination samples with its own "
    "settings, so a difference may be a sampler effect",
}


def write_comparison(out_dir: str, results: dict[str, Any], primary: str | None = None,
                     samplers: str = "as set per combination") -> None:
    """comparison.md (table), comparison.csv, comparison_seeds.csv and comparison.png."""
    # late: start-up time (genfw.metrics loads torch-fidelity, ~1 s; genfw.api imports this package)
    from genfw.metrics import NLL_KIND_LABELS

    columns = table_columns(results)
    cells = {name: {c.key: cell(r["seeds"], c.key) for c in columns} for name, r in results.items()}
    ns = sorted({n for per in cells.values() for _, _, n in per.values() if n})
    arrow = {"lower": " ↓", "higher": " ↑", "": ""}
    header = ["combination", "N"] + [f"{c.label}{arrow[c.better]}" for c in columns]
    md = [f"Samplers: {samplers} — {SAMPLERS_TEXT.get(samplers, samplers)}.", ""]
    if ns and min(ns) >= MIN_SEEDS_FOR_T:
        md += [f"Mean [95% t-interval over N seeds, cut to the metric's range] (N = {', '.join(map(str, ns))}); "
               "every seed's value is in comparison_seeds.csv."]
    else:
        md += [f"Fewer than {MIN_SEEDS_FOR_T} seeds (N = {', '.join(map(str, ns)) or '0'}): every seed's value, "
               "no interval over seeds; in brackets the 95% interval within that seed's run (FID, KID: "
               "bootstrap over the samples with the reference fixed, for the value at this sample count; "
               "class accuracy, precision, coverage: Wilson), never outside the metric's range."]
    md += ["Shared across seeds: the data split, tokenizer, latent set, evaluation classifier and reference "
           "images; per seed: the prior's initial weights, batch order and noise, and its samples.", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in results:
        n = max((k for _, _, k in cells[name].values()), default=0)
        md.append("| " + " | ".join([name, str(n)] + [cells[name][c.key][0] for c in columns]) + " |")
    kinds = sorted({m.get(k) for r in results.values() for m in r["seeds"].values()
                    for k in m if k.endswith("/nll_kind")} - {None})
    if kinds:
        md += ["", "Held-out likelihood columns by kind (never compared across kinds):", ""]
        md += [f"- `{k}`: {NLL_KIND_LABELS.get(k, k)}" for k in kinds]
    stick = measuring_stick(results)
    if stick:
        md += ["", "## The measuring stick", ""] + [f"- {line}" for line in stick]
    md += ["", "Cost: prior train FLOPs = one training step counted by torch's FlopCounterMode "
           "(matmuls, convolutions) x steps; train s = wall time of the prior stage (shared priors "
           "counted in every combination that uses them); sampling FLOPs / image = one sampling call "
           "of the priors counted by FlopCounterMode (a cached autoregressive step counts what it "
           "computes for one token, a parallel step the whole grid); evals / image = backbone rows "
           "per image."]
    tuned = {n: r["tuned"] for n, r in results.items() if r.get("tuned") is not None}
    if tuned:
        md += ["", "## Tuned sampler settings", "",
               "| combination | tuned settings | validation value of each setting tried |", "|---|---|---|"]
        for name, t in tuned.items():
            tried = "; ".join(f"{', '.join(f'{k}={v}' for k, v in g['settings'].items())}: "
                              + (f"{g['value']:.4g}" if g["value"] is not None else "—") for g in t["grid"])
            chosen = ", ".join(f"{k}={v}" for k, v in t["settings"].items()) or "(no tunable setting)"
            md.append(f"| {name} | {chosen} | {t['metric']}: {tried} |")
    first = pick_primary(results, primary, columns)
    # a likelihood as primary metric: one test table per kind, never a pair across kinds
    primaries = [c for c in columns if primary and c.key.startswith(primary + "[")] or ([first] if first else [])
    if primary and not primaries:
        md += ["", f"No significance test: the primary metric '{primary}' is not among the results."]
    for primary_col in primaries:
        tests = significance(results, primary_col)
        md += ["", f"## Differences in {primary_col.label}", ""]
        if not tests:
            md.append("No test: it needs two combinations with at least two seeds each (paired: two common seeds).")
        else:
            md += _tests_markdown(tests)
    md += ["", "Overrides per combination:", ""]
    md += [f"- `{name}`: " + ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) for name, r in results.items()]
    io.write_text(os.path.join(out_dir, "comparison.md"), "\n".join(md) + "\n")

    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["combination"] + [f"{c.key}{suffix}" for c in columns for suffix in ("", ":low", ":high", ":n")])
    for name, r in results.items():
        row = [name]
        for c in columns:
            items = _seed_items(r["seeds"], c.key)
            iv = cells[name][c.key][1]
            row += ["", "", "", 0] if not items else [
                sum(v for _, v, _ in items) / len(items), iv.low if iv else "", iv.high if iv else "", len(items)]
        writer.writerow(row)
    io.write_text(os.path.join(out_dir, "comparison.csv"), buf.getvalue())

    buf = _io.StringIO()
    writer = csv.writer(buf)
    within = [c.key for c in columns if any(f"{c.key}:low" in m for r in results.values() for m in r["seeds"].values())]
    writer.writerow(["combination", "seed"] + [c.key for c in columns] + [f"{k}{s}" for k in within
                                                                           for s in (":low", ":high")])
    for name, r in results.items():
        for seed, m in r["seeds"].items():
            em = expand_kinds(m)
            writer.writerow([name, seed] + [em.get(c.key, "") for c in columns]
                            + [em.get(f"{k}{s}", "") for k in within for s in (":low", ":high")])
    io.write_text(os.path.join(out_dir, "comparison_seeds.csv"), buf.getvalue())
    _bar_chart(out_dir, results, columns, cells)


def measuring_stick(results: dict[str, Any]) -> list[str]:
    """What the comparison's FIDs and class accuracies are read against, a sentence each: the
    real-vs-real floor and the tokenizer's reconstruction FID at the runs' reference, each evaluation
    classifier's accuracy and calibration on held-out real images, and the runs whose samples the two
    classifiers judge differently beyond chance (exact McNemar). A value every run shares is said
    once; otherwise with the runs it belongs to."""
    runs = [(name if seed is None else f"{name} seed {seed}", m)
            for name, r in results.items() for seed, m in r["seeds"].items()]
    lines: list[str] = []

    def say(keys: tuple[str, ...], text) -> None:
        groups: dict[tuple, list[str]] = {}
        for run, m in runs:
            values = tuple(m.get(k) for k in keys)
            if isinstance(values[0], (int, float)):
                groups.setdefault(values, []).append(run)
        for values, names in groups.items():
            lines.append(text(*values) + ("" if len(groups) == 1 else f" ({', '.join(names)})"))

    def fid(v: float) -> str:  # a FID is >= 0; float error can dip below
        return _fmt(max(0.0, float(v)))

    say(("fidelity/floor_fid", "fidelity/floor_kid", "fidelity/floor_num_samples", "fidelity/num_reference"),
        lambda f, k, n, ref: f"Real-vs-real floor: FID {fid(f)}, KID {_fmt(k)} ({n} other held-out real images "
                             f"against the {ref} reference images): what real images score at this count.")
    say(("fidelity/reconstruction_fid", "fidelity/reconstruction_kid"),
        lambda f, k: f"The tokenizer's reconstructions of the reference images: FID {fid(f)}, KID {_fmt(k)}: "
                     "samples decoded by this tokenizer are not expected below it.")
    for i, prefix in enumerate(("classifier", "classifier2"), 1):
        say((f"{prefix}/heldout_accuracy", f"{prefix}/heldout_ece", f"{prefix}/num_heldout", f"{prefix}/arch"),
            lambda a, e, n, arch, i=i: f"Classifier {i} ({arch}; column \"class acc.{' (classifier 2)' * (i == 2)}\"): "
                                       f"accuracy {_fmt(a)} on {n} held-out real images, calibration error (ECE) "
                                       f"{_fmt(e)}.")
    judged = [(run, m["classifier/disagreement_p"]) for run, m in runs
              if isinstance(m.get("classifier/disagreement_p"), (int, float))]
    if judged:
        flagged = [f"{run} (p = {p:.2g})" for run, p in judged if p < DISAGREEMENT_P]
        lines.append(f"The two classifiers' class accuracies differ beyond chance (exact McNemar p < "
                     f"{DISAGREEMENT_P}) in {len(flagged)} of {len(judged)} runs"
                     + (f": {', '.join(flagged)}; there, class accuracy depends on which classifier judges."
                        if flagged else "."))
    return lines


def _pyplot():
    import matplotlib  # late: start-up time (matplotlib, needed only when a figure is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # late: after the backend is chosen

    return plt


def _save(fig, target: str) -> None:
    plt = _pyplot()
    png = _io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    io.write_bytes(target, png.getvalue())


def _bar_chart(out_dir: str, results: dict[str, Any], columns: list[Column], cells: dict[str, dict]) -> None:
    """Means with their clipped t-interval (>= 3 seeds) or every seed's value with its within-run interval.

    Quality and likelihood columns only; the costs are in the table.
    """
    cost = {c.key for c in COST_COLUMNS}
    numeric = [c for c in columns if c.key not in cost and all(cells[n][c.key][2] for n in results)]
    if not numeric:
        return
    plt = _pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric), 3.4), squeeze=False)
    for ax, c in zip(axes[0], numeric):
        bars, points = [], []  # (x, value, low, high): one matplotlib call each, not one per point
        for x, name in enumerate(names):
            iv = cells[name][c.key][1]
            if iv is not None:
                bars.append((x, iv.estimate, iv.low, iv.high))
                continue
            items = _seed_items(results[name]["seeds"], c.key)
            for j, (_, v, w) in enumerate(items):
                xj = x + 0.15 * (j - (len(items) - 1) / 2)
                points.append((xj, v, w.low if w is not None else v, w.high if w is not None else v))
        for group, kind in ((bars, "bar"), (points, "point")):
            if not group:
                continue
            xs, ys, lows, highs = zip(*group)
            if kind == "bar":
                ax.bar(xs, ys, color="tab:blue")
            # KID's unbiased estimate can fall below 0, where its interval (clipped to the true
            # KID's range, >= 0) does not reach: the point is drawn where it is, its bar from 0
            yerr = [[max(0.0, y - lo) for y, lo in zip(ys, lows)], [max(0.0, hi - y) for y, hi in zip(ys, highs)]]
            ax.errorbar(xs, ys, yerr=yerr, fmt="none" if kind == "bar" else "o", color="black" if kind == "bar"
                        else "tab:blue", capsize=2, markersize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(c.label, fontsize=8)
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "comparison.png"))


# --------------------------------------------------------------------------------------------
# sampling-steps sweep: the frontier


def write_sweep(out_dir: str, results: dict[str, Any], primary: str | None = None) -> None:
    """sweep.csv and sweep.png: quality against counted sampling FLOPs and seconds per image.

    A combination whose prior has no ``steps`` (autoregressive) is one point, from its main runs.
    Combinations are tested against each other at every step count (paired where they share the
    trained priors), and each combination at consecutive step counts (paired: one trained prior),
    Holm-corrected over all the sweep's tests together.
    """
    columns = table_columns({n: {"seeds": {**r["seeds"], **{f"{s}/{k}": m for s, per in r["sweep"].items()
                                                             for k, m in per.items()}}}
                             for n, r in results.items()})
    quality = pick_primary(results, primary, columns)
    md_path = os.path.join(out_dir, "comparison.md")
    if quality is None:  # nothing to plot: say so rather than fail after the runs
        io.write_text(md_path, io.read_bytes(md_path).decode() + "\nNo sweep plot: no quality metric "
                      "(fidelity or class_accuracy, or `primary:`) among the results.\n")
        return
    rows = []
    for name, r in results.items():
        points = sorted(r["sweep"].items()) or [(None, r["seeds"])]
        for steps, per_seed in points:
            text, iv, n = cell(per_seed, quality.key)
            if not n:
                continue
            cost = {}
            for k in ("evaluations_per_image", "flops_per_image", "seconds_per_image"):
                v = _values(per_seed, f"sample/{k}")
                cost[k] = sum(v) / len(v) if v else ""
            items = _seed_items(per_seed, quality.key)
            rows.append({"combination": name, "steps": steps if steps is not None else "", **cost,
                         quality.key: sum(v for _, v, _ in items) / n, f"{quality.key}:low": iv.low if iv else "",
                         f"{quality.key}:high": iv.high if iv else "", "n": n,
                         "per_seed": ";".join(f"{v:.6g}" for _, v, _ in items), "text": text})
    buf = _io.StringIO()
    fields = ["combination", "steps", "evaluations_per_image", "flops_per_image", "seconds_per_image", quality.key,
              f"{quality.key}:low", f"{quality.key}:high", "n", "per_seed"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(os.path.join(out_dir, "sweep.csv"), buf.getvalue())
    flops_axis = all(r["flops_per_image"] != "" for r in rows)
    x_axes = [("flops_per_image", "counted sampling FLOPs per image") if flops_axis
              else ("evaluations_per_image", "backbone evaluations per image"),
              ("seconds_per_image", "seconds per image")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (x_key, x_label) in zip(axes, x_axes):
        for name in results:
            pts = sorted((r for r in rows if r["combination"] == name and r[x_key] != ""), key=lambda r: r[x_key])
            if not pts:
                continue
            x = [p[x_key] for p in pts]
            y = [p[quality.key] for p in pts]
            line = ax.plot(x, y, marker="o" if len(pts) > 1 else "s", label=name,
                           linestyle="-" if len(pts) > 1 else "none")[0]
            if all(p[f"{quality.key}:low"] != "" for p in pts):  # >= 3 seeds: the clipped t-interval
                low, high = [p[f"{quality.key}:low"] for p in pts], [p[f"{quality.key}:high"] for p in pts]
                if len(pts) > 1:
                    ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
                else:
                    ax.errorbar(x, y, yerr=[[y[0] - low[0]], [high[0] - y[0]]], color=line.get_color(), capsize=3)
            else:  # fewer seeds: every seed's value, no band
                for p in pts:
                    seeds = [float(v) for v in p["per_seed"].split(";")]
                    ax.scatter([p[x_key]] * len(seeds), seeds, s=8, color=line.get_color(), alpha=0.5)
        ax.set_xscale("log")
        # plain numbers at 1-2-5 steps (the default minor-tick labels overlap on a short log axis)
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # late: as _pyplot's

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{quality.label}{' (lower is better)' if quality.better == 'lower' else ''}")
        ax.legend(fontsize=7)
    ns = sorted({r["n"] for r in rows})
    how = ("mean, 95% t-band cut to the metric's range" if ns and min(ns) >= MIN_SEEDS_FOR_T
           else "mean line, every seed as a dot, no band")
    fig.suptitle(f"{quality.label} vs sampling cost ({how}; N = {', '.join(map(str, ns))} seeds)", fontsize=9)
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "sweep.png"))
    lines = ["", "## Quality vs sampling cost (frontier)", "",
             f"![sweep](sweep.png)  (data: sweep.csv; {quality.label}: "
             + ("mean [95% t-interval]" if ns and min(ns) >= MIN_SEEDS_FOR_T else "every seed's value") + ")", "",
             "| combination | steps | sampling FLOPs / image | evals / image | s / image | " + quality.label + " |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.4g}" if v != "" else "—"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['combination']} | {r['steps']} | {fmt(r['flops_per_image'])} | "
                     f"{fmt(r['evaluations_per_image'])} | {fmt(r['seconds_per_image'])} | {r['text']} |")
    step_counts = sorted({s for r in results.values() for s in r["sweep"]})
    tests = []
    for steps in step_counts:
        entries = {n: (r["sweep"][steps], r.get("sweep_priors", {}).get(steps) or {})
                   for n, r in results.items() if steps in r["sweep"]}
        tests += _tests(entries, quality, label=str(steps))
    for name, r in results.items():  # one trained prior at consecutive step counts: paired
        for s1, s2 in zip(step_counts, step_counts[1:]):
            if s1 in r["sweep"] and s2 in r["sweep"]:
                tests += _tests({f"{name}@{s}": (r["sweep"][s], r.get("sweep_priors", {}).get(s) or {})
                                 for s in (s1, s2)}, quality, label=f"{s1} vs {s2}")
    if tests:
        lines += ["", f"### Differences in {quality.label} at each step count", ""]
        lines += _tests_markdown(_holm(tests), with_at=True)
    io.write_text(md_path, io.read_bytes(md_path).decode() + "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# the terminal


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the terminal: a few columns of the comparison, as in comparison.md."""
    columns = [c for c in table_columns(results)
               if c.key in ("fidelity/fid", "class_accuracy", "classifier2/class_accuracy", "train/flops",
                            "sample/seconds_per_image")
               or "bits_per_token" in c.key]
    header = ["combination", "N"] + [c.label for c in columns]
    rows = []
    for name, r in results.items():
        texts, n = [], 0
        for c in columns:
            text, _, k = cell(r["seeds"], c.key)
            n = max(n, k)
            texts.append(text)
        rows.append([name, str(n)] + texts)
    return header, rows


def tuned_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) for the terminal: each combination's tuned sampler settings and validation value."""
    rows = []
    metric = ""
    for name, r in results.items():
        t = r.get("tuned")
        if t is None:
            continue
        metric = t["metric"] or metric
        value = next((g["value"] for g in t["grid"] if g["settings"] == t["settings"]), None)
        rows.append([name, ", ".join(f"{k}={v}" for k, v in t["settings"].items())
                     or "(none of the tune: settings is a setting of this prior: sampled as its recipe says)",
                     f"{value:.4g}" if value is not None else "—", str(len(t["grid"]))])
    return ["combination", "tuned settings", f"{metric} (validation)", "settings tried"], rows
