"""genfw ablate: every combination runs, common stages are computed once, a comparison is written."""

import csv
import os

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


def test_ablate_compares_priors_on_shared_latents(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {
        "base": "base.yaml",
        "output_dir": str(tmp_path / "out"),
        "variants": {
            "sundae": {"prior.name": "sundae", "sample.params": {"steps": 4, "min_steps": 2}},
            "absorbing": {"prior.name": "absorbing", "prior.params": {"timesteps": 8, "nll_timesteps": 2},
                          "sample.params": {"steps": 4}},
            "autoregressive": {"prior.name": "autoregressive", "sample.params": {}},
        },
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


def test_ablation_file_errors_are_clear(tmp_path):
    (tmp_path / "grid.yaml").write_text("base: missing.yaml\ngrid: {seed: [1, 2]}\n")
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "grid.yaml")])
    assert result.exit_code == 2 and "recipe not found" in result.output
    (tmp_path / "bad.yaml").write_text("base: x.yaml\n")
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2 and "variants" in result.output


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
