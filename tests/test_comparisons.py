"""Comparisons that cannot mislead: likelihood kinds, sampler end values that default to the
start values, seeds with intervals and significance, training and sampling cost, steps sweeps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genfw import metrics
from genfw.config import apply_overrides, load_yaml, validate_recipe
from genfw.errors import ConfigError
from genfw.registry import build

K, GRID = 8, (4, 4)
TINY = {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}


def make(name: str, params: dict | None = None):
    return build("prior", name, params or {}, codebook_size=K, grid=list(GRID), num_classes=0, context=[],
                 backbone=TINY)


# --------------------------------------------------------------------------------------------
# likelihood kinds


class _CopyInput(nn.Module):
    """A 'denoiser' that knows nothing about the data: it predicts its input token."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.tensor(2.0))  # about the best a copier can do

    def forward(self, tokens, labels=None, context=None):
        return self.scale * nn.functional.one_hot(tokens, self.k).float()


def test_copy_the_input_model_is_never_reported_as_a_bound():
    prior = make("sundae", {"unroll_steps": 2})
    prior.backbone = _CopyInput(K)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (256, *GRID), generator=g)  # uniform: every model's NLL >= 3 bits
    got = metrics.prior_nll(prior, [{"codes": c} for c in codes.split(64)], generator=g)
    # The denoising loss of a model that only copies scores below the entropy of the data ...
    assert got["denoising_ce_bits_per_token"] < math.log2(K)
    # ... so it is named for what it is, and never under an NLL key or a bound's kind.
    assert got["nll_kind"] == "not_likelihood" and prior.nll_kind == "not_likelihood"
    assert not any(key.startswith("nll_bits") for key in got)


def test_absorbing_kind_is_bound_with_every_timestep_and_estimate_with_fewer():
    full = make("absorbing", {"timesteps": 8})
    quad = make("absorbing", {"timesteps": 8, "nll_timesteps": 2})
    batches = [{"codes": torch.randint(0, K, (16, *GRID))}]
    exact_t = metrics.prior_nll(full, batches, generator=torch.Generator().manual_seed(0))
    assert exact_t["nll_kind"] == "bound" and "nll_error_bits_per_token" not in exact_t
    est = metrics.prior_nll(quad, batches, generator=torch.Generator().manual_seed(0))
    assert est["nll_kind"] == "estimate" == quad.nll_kind
    assert est["nll_error_bits_per_token"] > 0
    assert make("autoregressive").nll_kind == "exact"


def _result(kind: str, value: float, **extra) -> dict:
    key = metrics.nll_value_key(kind)
    return {"overrides": {}, "seeds": {0: {f"prior0/{key}": value, "prior0/nll_kind": kind, **extra}}}


def test_comparison_table_never_mixes_kinds_in_one_column(tmp_path):
    from genfw.ablate import table_columns, write_comparison

    results = {"ar": _result("exact", 3.1), "absorbing": _result("bound", 3.3),
               "sundae": _result("not_likelihood", 2.9)}
    columns = table_columns(results)
    labels = {c.key: c.label for c in columns}
    assert "prior0/nll_bits_per_token[exact]" in labels and "prior0/nll_bits_per_token[bound]" in labels
    assert "denoising" in labels["prior0/denoising_ce_bits_per_token"]
    write_comparison(str(tmp_path), results)
    md = (tmp_path / "comparison.md").read_text()
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| combination"))
    header = lines[start]
    assert "NLL exact" in header and "NLL bound" in header and "not a likelihood" in header
    rows = {line.split("|")[1].strip(): line for line in lines[start + 2 : start + 5]}
    cells = [c.strip() for c in rows["sundae"].split("|")[2:-1]]
    names = [c.strip() for c in header.split("|")[2:-1]]
    nll_cols = [i for i, n in enumerate(names) if n.startswith("NLL")]
    assert nll_cols and all(cells[i] == "" for i in nll_cols), "SUNDAE's loss appeared in an NLL column"


# --------------------------------------------------------------------------------------------
# sampler end values


def test_sundae_end_values_default_to_the_start_values(monkeypatch):
    from genfw_sundae.sundae import sampler_ends

    prior = make("sundae")
    sp = prior.sampler_params({"temperature": 0.4, "sample_proportion": 0.2})
    assert sampler_ends(sp) == (0.4, 0.2)
    assert sampler_ends(prior.sampler_params({"temperature": 1.0, "temperature_end": 0.7})) == (0.7, 0.5)
    seen = []
    original = type(prior)._probs

    def spy(self, x, labels, context, temperature, guidance, windows):
        seen.append(temperature)
        return original(self, x, labels, context, temperature, guidance, windows)

    monkeypatch.setattr(type(prior), "_probs", spy)
    with torch.inference_mode():
        prior.sample(2, generator=torch.Generator().manual_seed(0), steps=5, temperature=0.4,
                     self_stopping=False)
    assert seen == pytest.approx([0.4] * 5)


def test_cli_temperature_and_proportion_flags_set_constants():
    from genfw.sampling import apply_flag_overrides, flag_overrides

    stored = {"steps": 20, "temperature": 0.8, "temperature_end": 0.6, "sample_proportion": 0.5}
    sundae, ar = make("sundae"), make("autoregressive")
    (sp,) = apply_flag_overrides([sundae], stored, flag_overrides(temperature=0.5, proportion=0.2))
    assert (sp.temperature, sp.temperature_end, sp.sample_proportion, sp.sample_proportion_end) == (0.5, 0.5, 0.2, 0.2)
    (sp,) = apply_flag_overrides([sundae], stored, flag_overrides(temperature=1.0, temperature_end=0.7))
    assert (sp.temperature, sp.temperature_end) == (1.0, 0.7)
    (sp,) = apply_flag_overrides([sundae], stored, {})
    assert (sp.temperature, sp.temperature_end) == (0.8, 0.6)  # nothing given: the stored schedule
    (sp,) = apply_flag_overrides([ar], {}, flag_overrides(temperature=0.9))
    assert sp.temperature == 0.9
    with pytest.raises(ConfigError, match="--proportion"):
        apply_flag_overrides([ar], {}, flag_overrides(proportion=0.3))


def test_sundae_sampling_ablation_measures_constant_proportions():
    from pathlib import Path

    from genfw_sundae.sundae import sampler_ends

    from genfw.ablate import _as_set, combinations, load_ablation

    folder = Path(__file__).parents[1] / "recipes" / "ablations"
    spec = load_ablation(str(folder / "sundae_sampling.yaml"))
    base = load_yaml(folder / spec["base"])
    proportions = set()
    prior = make("sundae")
    for _, overrides in combinations(spec):
        resolved = validate_recipe(apply_overrides(base, list(spec.get("set") or []) + _as_set(overrides)))
        sp = prior.sampler_params(resolved.sampler_params[0])
        t_end, p_end = sampler_ends(sp)
        assert p_end == sp.sample_proportion, "the proportion anneals: not Fig. 8's constant proportions"
        assert t_end == sp.temperature
        proportions.add(sp.sample_proportion)
    assert proportions == {0.2, 0.5, 0.8}


# --------------------------------------------------------------------------------------------
# statistics


def test_t_distribution_and_welch_match_tables():
    from genfw.stats import holm, summarize, t_cdf, t_ppf, welch

    # two-sided 95% critical values of Student's t (any statistics table)
    for df, crit in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)):
        assert t_ppf(0.975, df) == pytest.approx(crit, abs=1e-4)
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.n) == (2.0, 3) and s.half_width == pytest.approx(4.3027 * 1 / math.sqrt(3), rel=1e-4)
    assert summarize([5.0]).half_width == 0.0
    w = welch([1.0, 2.0, 3.0, 4.0], [3.0, 5.0, 7.0, 9.0, 11.0])
    # by hand: t = (2.5 - 7) / sqrt(1.6667/4 + 10/5) = -2.8947; df = 2.4167^2 / (0.4167^2/3 + 2^2/4) = 5.5208
    assert w.t == pytest.approx(-2.8947, abs=1e-3) and w.df == pytest.approx(5.5208, abs=1e-3)
    assert w.p == pytest.approx(2 * t_cdf(w.t, w.df))
    try:
        from scipy import stats as sps  # not a dependency; cross-check where it happens to be installed
    except ImportError:
        pass
    else:
        ref = sps.ttest_ind([1.0, 2.0, 3.0, 4.0], [3.0, 5.0, 7.0, 9.0, 11.0], equal_var=False)
        assert w.p == pytest.approx(ref.pvalue, rel=1e-6)
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]


# --------------------------------------------------------------------------------------------
# genfw ablate --seeds, cost columns and the steps sweep (one tiny end-to-end run)


def test_ablate_seeds_costs_and_steps_sweep(tmp_path):
    import csv
    import os

    import yaml
    from test_ablate import BASE
    from typer.testing import CliRunner

    from genfw.cli import app

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {"base": "base.yaml", "output_dir": str(tmp_path / "out"),
            "variants": {"sundae": {"prior.name": "sundae", "sample.params": {"steps": 4, "min_steps": 2}},
                         "autoregressive": {"prior.name": "autoregressive", "sample.params": {}}},
            "sweep": {"steps": [2, 4]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    from genfw import evaluate

    evaluate._CLASSIFIERS.clear()  # trained by earlier tests of this process on the same data
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "grid.yaml"), "--seeds", "2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    # shared across seeds: one tokenizer and one latent set; one prior per combination and seed
    shared = os.listdir(out / "_shared")
    assert sum(s.startswith("tokenizer-") for s in shared) == 1
    assert sum(s.startswith("latents-") for s in shared) == 1
    assert sum(s.startswith("prior0-") for s in shared) == 4
    means = {r["combination"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    assert set(means) == {"sundae", "autoregressive"}
    for r in means.values():
        # N = 2: no t-interval over seeds (its quantile is 12.7); per-seed values with in-run intervals instead
        assert r["class_accuracy:n"] == "2" and r["class_accuracy:low"] == r["class_accuracy:high"] == ""
        assert float(r["sample/flops_per_image"]) > 0
        assert float(r["train/flops"]) > 0 and float(r["sample/evaluations_per_image"]) > 0
        assert float(r["train_seconds"]) > 0
    per_seed = list(csv.DictReader(open(out / "comparison_seeds.csv")))
    assert sorted((r["combination"], r["seed"]) for r in per_seed) == [
        ("autoregressive", "0"), ("autoregressive", "1"), ("sundae", "0"), ("sundae", "1")]
    # the mean column is the mean of the per-seed values
    accs = [float(r["class_accuracy"]) for r in per_seed if r["combination"] == "sundae"]
    assert float(means["sundae"]["class_accuracy"]) == pytest.approx(sum(accs) / 2)
    # a prior's training FLOPs are the same for both seeds (same model, same steps)
    flops = {r["train/flops"] for r in per_seed if r["combination"] == "sundae"}
    assert len(flops) == 1
    for r in per_seed:  # every seed's value with its within-run interval, inside the metric's range
        assert 0 <= float(r["class_accuracy:low"]) <= float(r["class_accuracy"]) <= float(r["class_accuracy:high"]) <= 1
        assert 0 <= float(r["fidelity/fid:low"]) <= float(r["fidelity/fid:high"])
    md = (out / "comparison.md").read_text()
    assert "Fewer than 3 seeds" in md and "t-interval" not in md
    assert "Samplers: frontier" in md
    assert "Welch" in md and ("not significant" in md or "significant after Holm" in md)
    assert "sundae vs autoregressive" in md or "autoregressive vs sundae" in md
    # the sweep: SUNDAE at each step count, the autoregressive prior as one point
    sweep = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["combination"], r["steps"]) for r in sweep if r["combination"] == "sundae"] == [
        ("sundae", "2"), ("sundae", "4")]
    assert [r["steps"] for r in sweep if r["combination"] == "autoregressive"] == [""]
    evals = [float(r["evaluations_per_image"]) for r in sweep if r["combination"] == "sundae"]
    assert evals[0] < evals[1]  # more steps, more evaluations (self-stopping after min_steps 2)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # a sweep point evaluates only what the sampler changes; the prior's NLL and the tokenizer's
    # reconstruction come from its seed's main run (the same trained models)
    import json

    point = json.loads((out / "sundae" / "seed-1" / "steps-2" / "metrics.json").read_text())
    main = json.loads((out / "sundae" / "seed-1" / "metrics.json").read_text())
    assert not any(k.startswith(("prior0/", "tokenizer/")) for k in point) and "fidelity/fid" in point
    assert any(k.startswith("prior0/") for k in main)  # SUNDAE: denoising cross-entropy, not an NLL
    # the two evaluation classifiers serve every run of the ablation, each trained once in the process
    for arch in ("convnet", "lenet"):
        assert result.output.count(f"training the evaluation classifier ({arch})") == 1, result.output
    assert "Quality vs sampling cost" in md or "Quality vs sampling cost" in (out / "comparison.md").read_text()
    # sweep points of one trained prior are a paired design: 2 vs 4 steps of sundae, both seeds
    assert "| sundae@2 vs sundae@4 | 2 vs 4 | paired, 2 seeds |" in md


def test_significance_only_within_one_likelihood_kind(tmp_path):
    from genfw.ablate import write_comparison

    def seeds(kind: str, values: list[float], acc: list[float]) -> dict:
        key = f"prior0/{metrics.nll_value_key(kind)}"
        return {"overrides": {}, "seeds": {i: {key: v, "prior0/nll_kind": kind, "class_accuracy": a}
                                           for i, (v, a) in enumerate(zip(values, acc))}}

    results = {"ar": seeds("exact", [3.0, 3.1, 3.05], [0.90, 0.91, 0.92]),
               "ar_small": seeds("exact", [3.5, 3.6, 3.55], [0.90, 0.92, 0.91]),
               "absorbing": seeds("bound", [2.0, 2.1, 2.05], [0.50, 0.52, 0.51])}
    write_comparison(str(tmp_path), results, primary="prior0/nll_bits_per_token")
    md = (tmp_path / "comparison.md").read_text()
    assert "Shared across seeds" in md and "N = 3" in md
    pairs = [line for line in md.splitlines() if " vs " in line]
    # one test table per kind: the two exact NLLs are compared, the bound with neither
    assert len(pairs) == 1 and "ar vs ar_small" in pairs[0] and "| significant after Holm |" in pairs[0]
    assert "Differences in NLL bound" in md and "Differences in NLL exact" in md
    write_comparison(str(tmp_path), results, primary="class_accuracy")
    pairs = {line.split("|")[1].strip(): line for line in (tmp_path / "comparison.md").read_text().splitlines()
             if " vs " in line}
    assert "not significant" in pairs["ar vs ar_small"] and "| significant after Holm |" in pairs["ar vs absorbing"]


def test_ablation_file_checks_seeds_sweep_and_primary_before_running(tmp_path):
    from genfw.ablate import load_ablation

    for bad, words in (("seeds: [0, 0]", "repeated"), ("seeds: [-1]", "seeds"), ("seeds: 3", "seeds"),
                       ("sweep: {steps: [0]}", "sweep.steps"), ("sweep: {temperature: [1]}", "sweep"),
                       ("primary: fid", "primary")):
        (tmp_path / "a.yaml").write_text(f"base: b.yaml\nvariants: {{x: {{seed: 1}}}}\n{bad}\n")
        with pytest.raises(ConfigError, match=words):
            load_ablation(str(tmp_path / "a.yaml"))
