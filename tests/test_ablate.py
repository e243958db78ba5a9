"""genfw ablate: every combination runs, common stages are computed once, a comparison is written."""

import csv
import os

import pytest
import yaml
from typer.testing import CliRunner

from genfw.cli import app

BASE = {
    "name": "tiny-ablation",
    "data": {"name": "synthetic", "params": {"size": 40, "resolution": 4, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 4, "batch_size": 8}},
    "latents": {"holdout": 0.3},  # 12 held-out images: 6 per half (reference and floor), more than PRDC k = 5
    "sample": {"n": 8, "batch_size": 8, "params": {"steps": 4, "min_steps": 2}},
    "evaluate": {"n_samples": 8, "classifier_steps": 5, "metrics": ["nll", "fidelity"]},
}


VARIANTS = {
    "sundae": {"prior.name": "sundae", "sample.params": {"steps": 4, "min_steps": 2}},
    "absorbing": {"prior.name": "absorbing", "prior.params": {"timesteps": 8, "nll_timesteps": 2},
                  "sample.params": {"steps": 4}},
    "autoregressive": {"prior.name": "autoregressive", "sample.params": {}},
}


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One output root for this file's ablations: tokenizer, latents and priors train once (``out/_shared``)."""
    root = tmp_path_factory.mktemp("ablations")
    (root / "base.yaml").write_text(yaml.safe_dump(BASE))
    return root


def test_ablate_compares_priors_on_shared_latents(shared_root):
    tmp_path = shared_root
    grid = {
        "base": "base.yaml",
        "output_dir": str(tmp_path / "out"),
        "variants": VARIANTS,
        "grid": {"sample.batch_size": [4, 8]},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "grid.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert len(rows) == 6
    assert {r["combination"].split("_")[0] for r in rows} == {"sundae", "absorbing", "autoregressive"}
    # each prior's held-out value sits in the column of its kind, and only there
    kind_of = {"sundae": "prior0/denoising_ce_bits_per_token", "absorbing": "prior0/nll_bits_per_token[estimate]",
               "autoregressive": "prior0/nll_bits_per_token[exact]"}
    value_columns = set(kind_of.values())
    for r in rows:
        own = kind_of[r["combination"].split("_")[0]]
        assert float(r[own]) > 0
        assert all(r[c] == "" for c in value_columns - {own})
    assert (out / "comparison.md").exists() and (out / "comparison.png").exists()
    # one tokenizer and one latent dataset for all; one prior per prior kind (shared across batch sizes)
    shared = sorted(os.listdir(out / "_shared"))
    assert sum(s.startswith("tokenizer-") for s in shared) == 1
    assert sum(s.startswith("latents-") for s in shared) == 1
    assert sum(s.startswith("prior0-") for s in shared) == 3


def test_ablate_tunes_samplers_on_validation_and_reports_on_test(shared_root):
    """Two arms, each sampler tuned over a grid on the validation reference, reported on the test one."""
    import json

    from genfw import checkpoint

    grid = {"base": "base.yaml", "output_dir": str(shared_root / "out"),
            "variants": {"sundae": VARIANTS["sundae"], "absorbing": VARIANTS["absorbing"]},
            "tune": {"temperature": [0.5, 1.0], "sample_proportion": [0.8]}}  # a proportion: SUNDAE only
    (shared_root / "tune.yaml").write_text(yaml.safe_dump(grid))
    result = CliRunner().invoke(app, ["ablate", str(shared_root / "tune.yaml")])
    assert result.exit_code == 0, result.output
    assert "tuned sampler settings" in result.output
    out = shared_root / "out"
    for arm, slugs in (("sundae", ["sample_proportion=0.8_temperature=0.5", "sample_proportion=0.8_temperature=1.0"]),
                       ("absorbing", ["temperature=0.5", "temperature=1.0"])):
        assert sorted(os.listdir(out / arm / "tune")) == slugs
        tried = {}
        for slug in slugs:
            run = out / arm / "tune" / slug
            recipe = yaml.safe_load((run / "recipe.yaml").read_text())
            assert recipe["evaluate"]["reference"] == "validation"
            # the tuning runs sample the arm's one trained prior (trained once, shared)
            assert os.path.realpath(run / "prior0") == os.path.realpath(out / arm / "prior0")
            tried[slug] = json.loads((run / "metrics.json").read_text())["fidelity/fid"]
        reported = yaml.safe_load((out / arm / "recipe.yaml").read_text())
        assert reported["evaluate"]["reference"] == "test"
        best = min(tried, key=tried.get)  # FID: lower is better; the reported run uses the winner
        assert f"temperature={reported['sample']['params']['temperature']}" in best
        tuned_table = result.output.split("tuned sampler settings")[1]
        line = next(row for row in tuned_table.splitlines() if row.strip().startswith(arm + ":"))
        assert f"temperature={reported['sample']['params']['temperature']}" in line  # the tuned settings printed
        assert ("sample_proportion=0.8" in line) == (arm == "sundae"), result.output
        # per-sample outputs for the bootstrap: features of samples and reference, correctness per sample
        tensors, meta = checkpoint.read(out / arm / "evaluate" / "features.safetensors")
        assert tensors["sample_features"].shape[0] == BASE["evaluate"]["n_samples"] == tensors["correct"].numel()
        assert meta["reference"] == "test"
        # Wilson intervals of the proportions hold the values evaluation computed (same features, same rule)
        from genfw.ablate import within_run_intervals
        from genfw.stats import wilson

        metrics = json.loads((out / arm / "metrics.json").read_text())
        intervals = within_run_intervals(str(out / arm), n_boot=50)
        for key in ("fidelity/fid", "fidelity/kid"):
            assert 0 <= intervals[f"{key}:low"] <= max(metrics[key], 0) <= intervals[f"{key}:high"], key
        n, m = metrics["fidelity/num_samples"], metrics["fidelity/num_reference"]
        for key, count in (("class_accuracy", n), ("fidelity/precision", n), ("fidelity/coverage", m)):
            expected = wilson(round(metrics[key] * count), count)  # the same hits as evaluation counted
            assert (intervals[f"{key}:low"], intervals[f"{key}:high"]) == (expected.low, expected.high), key
        second = wilson(round(metrics["classifier2/class_accuracy"] * n), n)
        assert (intervals["classifier2/class_accuracy:low"], intervals["classifier2/class_accuracy:high"]) == \
            (second.low, second.high)
        table = [line.split(" | ") for line in (out / "comparison.md").read_text().splitlines()
                 if line.startswith("| combination |") or line.startswith(f"| {arm} |")]
        column = table[0].index("class acc. (classifier 2) ↑")  # the second classifier's column
        assert table[1][column] == f"{metrics['classifier2/class_accuracy']:.4g} [{second.low:.4g}, {second.high:.4g}]"
    md = (out / "comparison.md").read_text()
    assert "Samplers: tuned on validation, reported on test" in md and "## Tuned sampler settings" in md
    # the measuring stick, printed and written: the floor, the tokenizer's reconstructions, both classifiers
    m = json.loads((out / "sundae" / "metrics.json").read_text())
    stick = result.output.split("measuring stick:")[1]
    for text in (stick, md.split("## The measuring stick")[1]):
        assert f"Real-vs-real floor: FID {m['fidelity/floor_fid']:.4g}" in text
        assert "The tokenizer's reconstructions of the reference images: FID" in text
        assert f"Classifier 1 (convnet; column \"class acc.\"): accuracy {m['classifier/heldout_accuracy']:.4g} on " \
               f"{m['classifier/num_heldout']} held-out real images" in " ".join(text.split())
        assert f"Classifier 2 (lenet; column \"class acc. (classifier 2)\"): accuracy " \
               f"{m['classifier2/heldout_accuracy']:.4g}" in " ".join(text.split())
        assert "differ beyond chance (exact McNemar p < 0.05) in" in " ".join(text.split())
    assert "best" not in md.lower() and "clearly" not in md.lower()


def test_validation_and_test_references_are_disjoint():
    from genfw.data import split_halves

    idx = list(range(100, 137))
    val, test = split_halves(idx, 3)
    assert not set(val) & set(test) and sorted(val + test) == idx and len(val) == 18
    assert split_halves(idx, 3)[0] == val != split_halves(idx, 4)[0]


def test_ablation_file_errors_are_clear(tmp_path):
    (tmp_path / "grid.yaml").write_text("base: missing.yaml\ngrid: {seed: [1, 2]}\n")
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "grid.yaml")])
    assert result.exit_code == 2 and "recipe not found" in result.output
    (tmp_path / "bad.yaml").write_text("base: x.yaml\n")
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "variants" in result.output
    from genfw.ablate import load_ablation
    from genfw.errors import ConfigError

    for bad, words in (("tune: {temperature: 0.9}", "tune must map"), ("tune: {}", "tune must map"),
                       ("tune: {temperature: [1.0]}\nsweep: {steps: [2]}", "not both"),
                       ("tune: {temperature: [1, 2, 3, 4, 5], steps: [1, 2, 3, 4, 5]}", "at most"),
                       ("tune: {temperature: [1.0]}\nprimary: train/flops", "does not depend on the sampler")):
        (tmp_path / "t.yaml").write_text(f"base: b.yaml\nvariants: {{x: {{seed: 1}}}}\n{bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_ablation(str(tmp_path / "t.yaml"))
    # a setting no arm's sampler has fails before any run
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "variants": {"s": VARIANTS["sundae"]},
                                                     "tune": {"top_k": [5, 10]}, "output_dir": str(tmp_path / "o")}))
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "t.yaml")])
    assert result.exit_code == 2 and "none of the combinations' priors" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_shipped_ablations_validate_every_combination():
    from pathlib import Path

    import pytest

    from genfw.ablate import _as_set, combinations, load_ablation
    from genfw.config import apply_overrides, load_yaml, validate_recipe

    folder = Path(__file__).parents[1] / "recipes" / "ablations"
    files = [p for p in sorted(folder.glob("*.yaml")) if p.name != "base_mnist.yaml"]
    if not files:
        pytest.fail("no ablation recipes shipped")
    for path in files:
        assert path.read_text().startswith(f"# genfw ablate recipes/ablations/{path.name}")
        spec = load_ablation(str(path))
        base = load_yaml(folder / spec["base"])
        for _, overrides in combinations(spec):
            validate_recipe(apply_overrides(base, list(spec.get("set") or []) + _as_set(overrides)))


def test_comparison_pairs_what_shares_a_prior_and_keeps_intervals_in_range(tmp_path):
    """Synthetic results: sampler variants of one trained prior are paired, separately trained priors are not;
    from 3 seeds the t-interval is cut to the metric's range in the table, the CSVs and the plot data."""
    from genfw.ablate import write_comparison, write_sweep
    from genfw.stats import paired, summarize, welch

    def arm(fid: list[float], acc: list[float], prior: str, sweep: dict | None = None) -> dict:
        seeds = {s: {"fidelity/fid": f, "class_accuracy": a, "sample/flops_per_image": 1e6,
                     "sample/seconds_per_image": 0.1} for s, (f, a) in enumerate(zip(fid, acc))}
        return {"overrides": {}, "seeds": seeds, "priors": {s: [f"{prior}-{s}"] for s in seeds},
                "sweep": sweep or {}, "sweep_priors": {k: {s: [f"{prior}-{s}"] for s in v} for k, v in (sweep or {}).items()}}

    # p0.2 and p0.8 sample the same prior per seed: a large seed effect, a small consistent sampler effect
    results = {"p0.2": arm([3.0, 9.0, 0.5], [0.99, 0.70, 0.98], "sundae"),
               "p0.8": arm([3.5, 9.6, 1.1], [0.97, 0.66, 0.95], "sundae"),
               "ar": arm([4.0, 5.0, 4.5], [0.90, 0.92, 0.91], "ar")}
    for r in results.values():
        r["sweep"] = {8: r["seeds"]}
        r["sweep_priors"] = {8: r["priors"]}
    write_comparison(str(tmp_path), results)
    md = (tmp_path / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if " vs " in line}
    a, b = [3.0, 9.0, 0.5], [3.5, 9.6, 1.1]
    assert "paired, 3 seeds" in rows["p0.2 vs p0.8"] and f"{paired(a, b).p_t:.3g}" in rows["p0.2 vs p0.8"]
    assert "independent (Welch)" in rows["p0.2 vs ar"] and f"{welch(a, [4.0, 5.0, 4.5]).p:.3g}" in rows["p0.2 vs ar"]
    means = {r["combination"]: r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    raw = summarize(a)
    assert raw.mean - raw.half_width < 0 and float(means["p0.2"]["fidelity/fid:low"]) == 0.0
    raw = summarize([0.99, 0.70, 0.98])
    assert raw.mean + raw.half_width > 1 and float(means["p0.2"]["class_accuracy:high"]) == 1.0
    write_sweep(str(tmp_path), results)
    sweep = {r["combination"]: r for r in csv.DictReader(open(tmp_path / "sweep.csv"))}
    assert float(sweep["p0.2"]["fidelity/fid:low"]) == 0.0  # the band the plot draws starts at 0
    assert all(float(r["fidelity/fid:low"]) >= 0 for r in sweep.values())
    assert "| p0.2 vs p0.8 | 8 | paired, 3 seeds |" in (tmp_path / "comparison.md").read_text()


def test_tuning_picks_by_the_metric_direction_and_says_when_nothing_was_tunable():
    from genfw.ablate import BASE_COLUMNS, choose_tuned, tuned_rows

    fid, acc = (next(c for c in BASE_COLUMNS if c.key == k) for k in ("fidelity/fid", "class_accuracy"))
    per_point = {(("temperature", 0.8),): {0: {"fidelity/fid": 5.0, "class_accuracy": 0.7},
                                           1: {"fidelity/fid": 7.0, "class_accuracy": 0.7}},
                 (("temperature", 1.0),): {0: {"fidelity/fid": 5.5, "class_accuracy": 0.9},
                                           1: {"fidelity/fid": 5.5, "class_accuracy": 0.8}}}
    assert choose_tuned(per_point, fid)["settings"] == {"temperature": 1.0}  # mean 5.5 < 6.0
    assert choose_tuned(per_point, acc)["settings"] == {"temperature": 1.0}  # mean 0.85 > 0.7
    per_point[(("temperature", 1.0),)][1]["class_accuracy"] = 0.5
    assert choose_tuned(per_point, acc)["settings"] == {"temperature": 0.8}  # higher is better
    results = {"sundae": {"tuned": choose_tuned(per_point, fid)},
               "ar": {"tuned": {"settings": {}, "metric": "fidelity/fid", "grid": []}}}
    header, rows = tuned_rows(results)
    assert header[2] == "fidelity/fid (validation)"
    assert rows[0] == ["sundae", "temperature=1.0", "5.5", "2"]
    assert rows[1][0] == "ar" and "sampled as its recipe says" in rows[1][1] and rows[1][2] == "—"


def test_genfw_ablate_is_the_api_function_and_never_imports_the_api(monkeypatch):
    """``genfw.ablate(...)``, ``genfw.api.ablate`` and ``genfw.ablate.ablate`` are one function (a shipped
    ablation's name resolved to its file), and no module of genfw/ablate/ imports genfw.api (above it)."""
    import ast
    from pathlib import Path

    import genfw
    import genfw.ablate.runner
    import genfw.api

    seen = []
    monkeypatch.setattr(genfw.ablate.runner, "run_ablation",
                        lambda path, overrides, **kwargs: seen.append((path, overrides, kwargs)) or {"done": {}})
    assert genfw.ablate("ablations/priors", ["seed=1"], seeds=2) == {"done": {}}
    assert genfw.api.ablate is genfw.ablate.ablate
    path, overrides, kwargs = seen[0]
    assert path.endswith(os.path.join("ablations", "priors.yaml")) and os.path.isfile(path)
    assert overrides == ["seed=1"] and kwargs["seeds"] == 2
    sources = sorted(Path(genfw.ablate.__file__).parent.glob("*.py"))
    assert len(sources) > 1
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(n == "genfw.api" or n.startswith("genfw.api.") for n in names), (source, names)


def test_the_measuring_stick_says_a_shared_value_once_and_flags_disagreeing_classifiers():
    from genfw.ablate import measuring_stick

    def metrics(floor, p):
        return {"fidelity/floor_fid": floor, "fidelity/floor_kid": 0.001, "fidelity/floor_num_samples": 50,
                "fidelity/num_reference": 50, "fidelity/reconstruction_fid": -1e-9, "fidelity/reconstruction_kid": 0.0,
                "classifier/heldout_accuracy": 0.99, "classifier/heldout_ece": 0.01, "classifier/num_heldout": 100,
                "classifier/arch": "convnet", "classifier2/heldout_accuracy": 0.98, "classifier2/heldout_ece": 0.02,
                "classifier2/num_heldout": 100, "classifier2/arch": "lenet", "classifier/disagreement_p": p}

    shared = measuring_stick({"a": {"seeds": {0: metrics(1.5, 0.5), 1: metrics(1.5, 0.01)}},
                              "b": {"seeds": {0: metrics(1.5, 0.9), 1: metrics(1.5, 0.2)}}})
    assert shared[0].startswith("Real-vs-real floor: FID 1.5, KID 0.001 (50 other") and "(a seed" not in shared[0]
    assert "FID 0," in shared[1]  # a FID never prints below 0, whatever float error says
    assert "accuracy 0.99 on 100 held-out real images, calibration error (ECE) 0.01" in shared[2]
    assert "Classifier 2 (lenet" in shared[3] and "accuracy 0.98" in shared[3]
    assert shared[4].startswith("The two classifiers' class accuracies differ beyond chance") and \
        "in 1 of 4 runs: a seed 1 (p = 0.01)" in shared[4]
    # another tokenizer or reference: each value with the runs it belongs to
    split = measuring_stick({"a": {"seeds": {None: metrics(1.5, 0.5)}}, "b": {"seeds": {None: metrics(2.5, 0.5)}}})
    assert [line for line in split if line.startswith("Real-vs-real")] == [
        "Real-vs-real floor: FID 1.5, KID 0.001 (50 other held-out real images against the 50 reference images): "
        "what real images score at this count. (a)",
        "Real-vs-real floor: FID 2.5, KID 0.001 (50 other held-out real images against the 50 reference images): "
        "what real images score at this count. (b)"]
    assert split[-1].endswith("in 0 of 2 runs.")
    assert measuring_stick({"a": {"seeds": {None: {"fidelity/fid": 3.0}}}}) == []  # nothing to read against
