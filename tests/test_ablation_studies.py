"""The shipped MaskGIT-priors and quantizer studies run end to end with `genfw ablate`, shrunk to tiny
sizes (the variants as shipped; only sizes, steps and data are overridden)."""

import copy
import csv
from pathlib import Path

import pytest
import yaml
from test_ablate import BASE
from typer.testing import CliRunner

from genfw.cli import app

FOLDER = Path(__file__).parents[1] / "recipes" / "ablations"


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """Skip the PNGs (loss curves, sample sheets, bar chart): drawing them costs several times the
    tiny runs here, and tests/test_ablate.py checks them."""
    import genfw.ablate.report
    import genfw.report

    monkeypatch.setattr(genfw.report, "plot_curves", lambda *a, **k: False)
    monkeypatch.setattr(genfw.report, "plot_labelled_samples", lambda *a, **k: False)
    monkeypatch.setattr(genfw.ablate.report, "_bar_chart", lambda *a, **k: None)


def _tiny(spec: dict, tmp: Path, base: dict, shrink) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    spec = copy.deepcopy(spec)
    spec.update(base="base.yaml", output_dir=str(tmp / "out"))
    for overrides in spec["variants"].values():
        shrink(overrides)
    (tmp / "grid.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "grid.yaml"


def _run(path: Path, *extra: str) -> list[dict]:
    from genfw import evaluate

    evaluate._CLASSIFIERS.clear()  # trained by earlier tests of this process on other data
    result = CliRunner().invoke(app, ["ablate", str(path), *extra])
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(open(path.parent / "out" / "comparison.csv")))


def test_priors_study_with_maskgit_runs_tiny(tmp_path):
    spec = yaml.safe_load((FOLDER / "priors_maskgit.yaml").read_text())
    assert {"sundae", "absorbing", "autoregressive", "maskgit", "absorbing-cfg", "maskgit-cfg"} <= set(spec["variants"])

    def shrink(o: dict) -> None:
        if "steps" in o["sample.params"]:
            o["sample.params"]["steps"] = 4
        if o["prior.name"] == "absorbing":
            o["prior.params"].update(timesteps=8, nll_timesteps=2)
        if o["prior.name"] == "sundae":
            o["sample.params"]["min_steps"] = 2

    rows = _run(_tiny(spec, tmp_path, BASE, shrink))
    by = {r["combination"]: r for r in rows}
    assert set(by) == set(spec["variants"])
    # MaskGIT's masked cross-entropy sits in the not-a-likelihood column, with SUNDAE's
    assert float(by["maskgit"]["prior0/denoising_ce_bits_per_token"]) > 0
    assert by["maskgit"]["prior0/nll_bits_per_token[estimate]"] == ""
    assert float(by["maskgit-cfg"]["sample/evaluations_per_image"]) > float(by["maskgit"]["sample/evaluations_per_image"])


def test_quantizer_study_runs_tiny(tmp_path):
    spec = yaml.safe_load((FOLDER / "quantizers.yaml").read_text())
    assert {o["tokenizer.name"] for o in spec["variants"].values()} == {"vqgan", "fsq", "lfq"}
    base = {**BASE, "data": {"name": "synthetic", "params": {"size": 40, "resolution": 8, "num_classes": 2}},
            "train": {**BASE["train"], "tokenizer": {"steps": 2, "batch_size": 8}},
            "evaluate": {**BASE["evaluate"], "metrics": ["reconstruction", "nll", "fidelity"]}}

    def shrink(o: dict) -> None:
        o["tokenizer.params"].update(ch=32, ch_mult=[1, 2], z_channels=8)

    rows = _run(_tiny(spec, tmp_path, base, shrink), "--set", "prior.params={timesteps: 8, nll_timesteps: 2}",
                "--set", "sample.params={steps: 4}")
    by = {r["combination"]: r for r in rows}
    assert set(by) == {"vq", "fsq", "lfq"}
    shared = list((tmp_path / "out" / "_shared").iterdir())
    assert sum(p.name.startswith("tokenizer-") for p in shared) == 3  # one tokenizer per quantizer
    for r in rows:  # reconstruction and codebook use beside the prior's quality, per quantizer
        assert float(r["prior0/nll_bits_per_token[estimate]"]) > 0
        assert float(r["tokenizer/mse"]) > 0 and 0 < float(r["tokenizer/level0/usage"]) <= 1
        assert float(r["tokenizer/level0/perplexity"]) >= 1
    assert "codebook usage" in (tmp_path / "out" / "comparison.md").read_text()
