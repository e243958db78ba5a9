"""The study's tables and verdicts (benchmarks/study_mnist.py tables) on small made-up CSVs."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_mnist", ROOT / "benchmarks" / "study_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _data(tmp_path: Path, study, absorbing_nll: float, low_p_better: bool, plateaued: bool = True) -> Path:
    """CSVs shaped like the study's: 3 seeds, absorbing's bound at ``absorbing_nll`` against an
    autoregressive NLL of 2.0, and p = 0.2 better (or worse) than 0.8 on every seed at the study's steps (64)."""
    curves, runs, nll, diffs = [], [], [], []
    for prior in study.PRIORS:
        for seed in study.SEEDS:
            for step, v in ((250, 3.2), (500, 3.0), (1000, 2.6), (1500, 2.59)):
                v += 0.1 if prior == "absorbing_elbo" else 0.0
                curves.append({"prior": prior, "seed": seed, "step": step, "validation_bits_per_token": v + seed / 100,
                               "kind": "bound", "train_seconds": step / 4})
            value = {"absorbing": absorbing_nll, "autoregressive": 2.0}.get(prior, 2.5) + seed / 1000
            nll.append({"prior": prior, "seed": seed, "train_steps": 1500, "stopped_at": 1500, "max_steps": 2000,
                        "plateaued": plateaued,
                        "test_bits_per_token": value, "kind": "bound"})
    metrics = {"fidelity/fid:low": 1.0, "fidelity/fid:high": 9.0, "fidelity/floor_fid": 0.5,
               "fidelity/reconstruction_fid": 0.7, "class_accuracy": 0.9, "classifier2/class_accuracy": 0.88,
               "classifier/heldout_accuracy": 0.99, "classifier2/heldout_accuracy": 0.991,
               "classifier/heldout_ece": 0.01, "classifier2/heldout_ece": 0.005, "classifier/disagreement_p": 0.5,
               "sample/seconds_per_image": 0.01, "sample/flops_per_image": 1e9}

    def run(arm, prior, seed, fid, steps=64, temperature=1.0, proportion="", split="test"):
        runs.append({"arm": arm, "prior": prior, "seed": seed, "split": split, "steps": steps,
                     "temperature": temperature, "proportion": proportion, "fidelity/fid": fid} | metrics)

    for prior, base in (("sundae", 5.0), ("absorbing", 4.0), ("autoregressive", 6.0)):
        for seed in study.SEEDS:
            for tau in study.TUNE[prior]:
                run("tune", prior, seed, base + abs(tau - 0.9), temperature=tau, split="validation")
            run("full", prior, seed, base + seed / 10)
            run("tuned", prior, seed, base - 0.5 + seed / 10, temperature=0.9)
    for seed in study.SEEDS:
        for steps in study.PROPORTION_STEPS:
            sign = -1 if low_p_better else 1
            for p, fid in ((0.2, 5 + sign * (1 + seed / 7)), (0.8, 5)):
                run("proportion", "sundae", seed, fid, steps=steps, temperature=0.8, proportion=p)
            d = sign * (1 + seed / 7)
            diffs.append({"seed": seed, "steps": steps, "a": 0.2, "b": 0.8, "fid_difference": d,
                          "low": d - 0.5, "high": d + 0.5})
    for name, rows in (("curves", curves), ("runs", runs), ("nll", nll), ("proportion_differences", diffs)):
        _write(tmp_path / f"study_{name}.csv", rows)
    return tmp_path


def test_verdicts_follow_the_tests_in_the_papers_direction(tmp_path, study):
    text = study.tables(_data(tmp_path, study, absorbing_nll=1.5, low_p_better=True))
    nll_line = next(line for line in text.splitlines() if line.startswith("- NLL half"))
    assert "**Verdict: consistent with the paper**" in nll_line  # bound 0.5 below the exact NLL on 3 seeds
    fid_line = next(line for line in text.splitlines() if line.startswith("- FID half"))
    assert "consistent with" in fid_line  # absorbing FID 4 against 6 on every seed
    # Fig. 6: the plain ELBO's bound is 0.1 above at every checkpoint
    assert "**Verdict: consistent with the paper**: the reweighted bound is lower at 2 of 2" in text
    # Fig. 8: p = 0.2 better on every seed, but 3 pairs cannot pass the exact sign-flip test
    assert "**Verdict (64 steps): inconclusive.**" in text
    assert "- 64 steps: p = 0.2 had the lower FID on 3 of 3 seeds; its bootstrap interval lies below 0 on 3" in text
    assert "cannot go below 0.25" in text
    # the tuned temperature is the one with the lowest mean validation FID
    assert "- absorbing: τ = 0.2: 4.70, τ = 0.3: 4.60, τ = 0.4: 4.50, τ = 0.5: 4.40, τ = 0.6: 4.30, τ = 0.7: 4.20, τ = 0.8: 4.10, τ = 0.9: 4.00, τ = 1.0: 4.10 → τ = 0.9" in text
    # no interval leaves the metric's range; intervals only with 3 seeds
    assert "not tested under the paper's conditions" in text  # 2D vs 1D resampling


def test_a_result_against_the_paper_contradicts_it(tmp_path, study):
    text = study.tables(_data(tmp_path, study, absorbing_nll=2.5, low_p_better=False))
    nll_line = next(line for line in text.splitlines() if line.startswith("- NLL half"))
    assert "**Verdict: contradicts the paper**" in nll_line


def test_verdict_words_are_fixed(study):
    assert study.verdict(True, 0.01) == "consistent with"
    assert study.verdict(False, 0.01) == "contradicts"
    assert study.verdict(True, 0.2) == "inconclusive"
    assert set(study.VERDICTS) >= {"consistent with", "contradicts", "inconclusive",
                                    "not tested under the paper's conditions"}


def test_plateau_rule(study):
    # the last quarter (steps > 1500 of 2000) improved the best value by less than 1%: a plateau
    assert study.plateaued([(500, 3.0), (1000, 2.6), (1500, 2.5), (2000, 2.49)])
    assert not study.plateaued([(500, 3.0), (1000, 2.6), (1500, 2.5), (2000, 2.4)])  # 4% better: train on
    assert study.plateaued([(500, 3.0), (1000, 2.6), (1500, 2.5), (2000, 2.7)])  # worse (overfitting): stop
    assert not study.plateaued([(250, 3.0)])  # one checkpoint says nothing
    assert not study.plateaued([])  # nor does none


def test_table4_needs_converged_models(tmp_path, study):
    """Table 4 compares models trained to convergence: off a plateau, the test is shown, not the verdict."""
    text = study.tables(_data(tmp_path, study, absorbing_nll=1.5, low_p_better=True, plateaued=False))
    nll_line = next(line for line in text.splitlines() if line.startswith("- NLL half"))
    assert "**Verdict: not tested under the paper's conditions**" in nll_line
    assert "0 of these 6 are on a validation plateau" in nll_line and "would say: consistent with" in nll_line
    assert not any(line.startswith("- Scale:") for line in text.splitlines())


def test_table4_verdicts_on_converged_models_name_the_scale(tmp_path, study):
    """On a plateau the verdict is given, with the scale it was reached at beside the paper's."""
    text = study.tables(_data(tmp_path, study, absorbing_nll=2.5, low_p_better=True))
    scale = next(line for line in text.splitlines() if line.startswith("- Scale:"))
    assert f"({study.PRIOR_PARAMETERS:,} parameters)" in scale and "80M-parameter" in scale
    assert "not tested here" in scale


def test_the_parameter_count_on_the_page_is_the_studys_priors(study):
    import yaml

    from genfw.registry import build

    base = yaml.safe_load(study.BASE.read_text())
    backbone = base["prior"]["backbone"]
    for prior, params in (("absorbing", {"timesteps": 64, "loss_type": "reweighted_elbo"}), ("autoregressive", {})):
        model = build("prior", prior, params, codebook_size=base["tokenizer"]["params"]["codebook_size"],
                      grid=[8, 8], num_classes=10, context=[], backbone=backbone)
        assert sum(p.numel() for p in model.parameters()) == study.PRIOR_PARAMETERS


def test_wall_time_table_from_the_timing_csv(tmp_path, study):
    """`time`'s CSV becomes a table (ms per step or image, the load average it was measured at) and
    each prior's training time at the steps the study trained; without the CSV there is no table."""
    data = _data(tmp_path, study, absorbing_nll=1.5, low_p_better=True)
    assert "Wall time on an otherwise idle machine" not in study.tables(data)
    rows = [{"what": "train", "prior": p, "setting": "200 steps, batch 64", "seconds": 100.0, "per": "step",
             "value": 0.5, "load_before": 0.1} for p in study.PRIORS]
    rows.append({"what": "sample", "prior": "sundae", "setting": "full: steps=100", "seconds": 25.0, "per": "image",
                 "value": 0.05, "load_before": 1.02})
    _write(data / "study_timing.csv", rows)
    text = study.tables(data)
    assert "| sundae | sample | full: steps=100 | 25.0 | 50.0 ms / image | 1.02 |" in text
    assert "| absorbing | train | 200 steps, batch 64 | 100.0 | 500.0 ms / step | 0.10 |" in text
    # stopped at 1,500 steps (the made-up nll CSV) at 0.5 s a step: 12.5 min per seed
    assert "absorbing 1,500 steps mean, 12.5 min per seed" in text


def test_a_model_that_trains_on_is_not_trained_meanwhile(tmp_path, study):
    """`train` with a higher cap removes the done.json of a model it will train on (so `sample --wait`
    waits for it) and keeps that of a model on its plateau or already trained to the cap."""
    import json

    def folder(name: str, plateaued: bool, max_steps: int) -> Path:
        f = tmp_path / name
        f.mkdir(parents=True)
        (f / "done.json").write_text(json.dumps({"stopped_at": max_steps, "plateaued": plateaued,
                                                 "max_steps": max_steps, "best_step": max_steps, "best": 2.0}))
        return f

    capped, flat, done = folder("capped", False, 2000), folder("flat", True, 2000), folder("done", False, 5000)
    assert not study.finished(capped, 5000) and not (capped / "done.json").exists()
    assert study.finished(flat, 5000) and (flat / "done.json").exists()
    assert study.finished(done, 5000) and (done / "done.json").exists()
    # `sample --wait` sees a prior as trained only while every seed has its done.json
    out = tmp_path / "study"
    seeds = [folder(f"study/train/absorbing/seed-{s}", False, 2000) for s in study.SEEDS]
    assert study.trained(out, "absorbing")
    study.finished(seeds[1], 5000)
    assert not study.trained(out, "absorbing")

    # a done.json genfw did not write, or a symlink into someone else's file, is refused, not removed
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "done.json").write_text('{"mine": 1}')
    with pytest.raises(SystemExit, match="not a record"):
        study.finished(tmp_path / "foreign", 5000)
    assert (tmp_path / "foreign" / "done.json").exists()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "done.json").symlink_to(tmp_path / "capped")
    with pytest.raises(SystemExit, match="symlink"):
        study.finished(tmp_path / "linked", 5000)


def test_time_reuses_a_measurement_only_for_the_same_model(tmp_path, study, monkeypatch):
    """`time` keeps an earlier measurement with its load average, but a sampling speed belongs to one
    trained model: once the kept model changes (trained on), its sampling is measured again and the
    table names the model; training speeds (from scratch) are kept."""
    import json

    import genfw.pipeline

    measured = []

    class FakeRun:
        def __init__(self, res, output_dir):
            self.dir = Path(output_dir)

        def run(self, stages):
            assert not self.dir.exists(), "a measurement must not reuse an earlier run's folder (nor its seconds)"
            measured.append(self.dir.name)
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "stage.json").write_text(json.dumps({"seconds": 10.0}))
            (self.dir / "timing.json").write_text(json.dumps({"seconds": 5.0, "n": 500}))

        def path(self, *parts):
            return str(self.dir / parts[-1])

    monkeypatch.setattr(genfw.pipeline, "Run", FakeRun)
    monkeypatch.setattr(study, "link_shared", lambda run, shared: None)
    monkeypatch.setattr(study, "resolve", lambda overrides: overrides)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, data = tmp_path / "out", _data(tmp_path, study, absorbing_nll=1.5, low_p_better=True)

    def kept(step: int) -> None:
        for prior in study.MAIN:
            folder = out / "train" / prior / "seed-0"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "done.json").write_text(json.dumps({"stopped_at": step, "plateaued": False, "max_steps": step,
                                                          "best_step": step, "best": 2.0}))

    kept(5000)
    study.time_all(out, data)
    first = list(measured)
    assert len([m for m in first if m.startswith("train-")]) == len(study.PRIORS)
    assert len([m for m in first if m.startswith("sample-")]) >= len(study.MAIN)
    measured.clear()
    study.time_all(out, data)
    assert measured == []  # the same models: every measurement reused
    kept(8000)
    study.time_all(out, data)
    assert sorted(measured) == sorted(m for m in first if m.startswith("sample-"))
    assert "(seed 0, step 8000 model)" in study.tables(data)
