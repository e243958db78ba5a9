"""Training loggers: the `log:` recipe key, jsonl/csv/tensorboard built-ins, failure isolation, the docs example."""

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from genfw.config import TrainSpec, validate_recipe
from genfw.errors import ConfigError, PluginError
from genfw.hookspecs import hookimpl
from genfw.interfaces import Component, StepOutput
from genfw.loggers import Logger, LoggerSet
from genfw.registry import get_registry
from genfw.testing import check_logger
from genfw.train import Trainer

pytest.importorskip("tensorboard", reason="the tensorboard logger needs the [tensorboard] extra (in [dev])")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RECIPE = {
    "name": "tiny-log",
    "seed": 1,
    "data": {"name": "synthetic", "params": {"size": 24, "resolution": 8, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "checkpoint_every": 3,
                        "sample_every": 3}},
    "latents": {"holdout": 0.25},
    "sample": {"n": 4, "batch_size": 4, "params": {"steps": 4, "min_steps": 2}},
}


# -- readers: {tag: {step: value}} ------------------------------------------------------------


def read_jsonl(directory) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in (Path(directory) / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in record.items():
            if tag != "step":
                out.setdefault(tag, {})[record["step"]] = value
    return out


def read_csv(directory) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(Path(directory) / "log.csv", newline="") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag != "step" and value != "":
                    out.setdefault(tag, {})[int(row["step"])] = float(value)
    return out


def events(directory) -> EventAccumulator:
    acc = EventAccumulator(str(Path(directory) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def read_tensorboard(directory) -> dict[str, dict[int, float]]:
    acc = events(directory)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


READERS = {"jsonl": read_jsonl, "csv": read_csv, "tensorboard": read_tensorboard}


@pytest.mark.parametrize("name", sorted(READERS))
def test_builtin_logger_reads_back_what_it_logged_and_resumes(name, monkeypatch):
    """Every built-in passes check_logger with a reader: values, steps and a resume that replaces steps."""
    from tensorboard.summary.writer import event_file_writer

    # event files of one process and second are ordered by a counter compared as text ("10" <
    # "9"): start it where check_logger's three sessions cannot gain a digit
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(10**6))
    check_logger(name, {}, read_back=READERS[name])


# -- a tiny real run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    from genfw.pipeline import Run

    out = tmp_path_factory.mktemp("logged") / "run"
    resolved = validate_recipe({**RECIPE, "log": ["jsonl", "csv", {"name": "tensorboard", "params": {"flush_secs": 5}}]})
    Run(resolved, output_dir=str(out)).run(["tokenizer", "latents", "prior"])
    return out


def test_tensorboard_events_hold_the_training_scalars(logged_run):
    acc = events(logged_run / "prior0")
    tags = set(acc.Tags()["scalars"])
    assert {"loss/main", "lr", "steps_per_s", "bits_per_token", "accuracy"} <= tags, tags
    assert [e.step for e in acc.Scalars("loss/main")] == [2, 4, 6]
    jsonl = read_jsonl(logged_run / "prior0")
    for tag in tags:  # the same numbers as log.jsonl (float32 in the event file)
        assert {e.step: pytest.approx(e.value, rel=1e-6) for e in acc.Scalars(tag)} == jsonl[tag]


def test_sample_grids_during_training_reach_tensorboard(logged_run):
    """train.prior.sample_every: each preview grid is also an image in TensorBoard, pixel for pixel."""
    import io

    import numpy as np
    from PIL import Image

    images = events(logged_run / "prior0").Images("samples")
    assert [e.step for e in images] == [3, 6]
    for e in images:
        stored = Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")
        preview = Image.open(logged_run / "prior0" / "previews" / f"step-{e.step:07d}.png").convert("RGB")
        assert np.array_equal(np.asarray(stored), np.asarray(preview))


def test_csv_has_a_header_and_the_rows_of_jsonl(logged_run):
    lines = (logged_run / "prior0" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    with open(logged_run / "prior0" / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(records[0]), "header: step, then the tags in the order they were logged"
    assert len(rows) == 1 + len(records)
    for row, record in zip(rows[1:], records):
        assert int(row[0]) == record["step"]
        assert [float(v) for v in row[1:]] == [record[k] for k in rows[0][1:]]  # exact: repr of floats


class Regressor(Component):
    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        self.linear = torch.nn.Linear(4, 1)
        self.critic = torch.nn.Linear(4, 1)

    def param_groups(self):
        return {"main": list(self.linear.parameters()), "critic": list(self.critic.parameters())}

    def training_step(self, batch, step):
        x, y = batch
        main = ((self.linear(x).squeeze(-1) - y) ** 2).mean()
        return StepOutput({"main": main, "critic": self.critic(x).pow(2).mean()}, {"usage": 0.5})


@pytest.fixture
def data():
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, x.sum(1))


SPEC = TrainSpec(steps=4, batch_size=8, lr=0.01, log_every=2, groups={"critic": {"lr": 0.002}})


def test_images_and_per_group_learning_rates_reach_tensorboard(tmp_path, data):
    """Trainer.loggers.log_image (how sample grids are logged) gives an image tag; each group's lr is logged."""
    grid = torch.linspace(-1, 1, 3 * 10 * 12).view(3, 10, 12)
    trainer = Trainer(Regressor(), data, SPEC, tmp_path, log=["tensorboard", "jsonl"])
    trainer.on_step = lambda step, logs: trainer.loggers.log_image(step, "samples/grid", grid)
    trainer.fit()
    acc = events(tmp_path)
    images = acc.Images("samples/grid")
    assert [(e.step, e.width, e.height) for e in images] == [(2, 12, 10), (4, 12, 10)]
    assert {"lr/main", "lr/critic", "usage", "loss/critic"} <= set(acc.Tags()["scalars"])
    lrs = read_jsonl(tmp_path)
    assert lrs["lr/main"][4] == pytest.approx(0.01) and lrs["lr/critic"][4] == pytest.approx(0.002)


def test_a_batch_or_a_pil_image_is_logged_as_one_image(tmp_path):
    """What a sample-grid hook hands over: a float batch [B, C, H, W] (tiled as grid.png is) or a PIL grid."""
    from genfw.images import make_grid

    batch = torch.rand(4, 3, 8, 8) * 2 - 1
    loggers = LoggerSet(["tensorboard"], str(tmp_path))
    loggers.log_image(5, "samples", batch)
    loggers.log_image(6, "grid", make_grid(batch[:, :1]))
    loggers.close()
    acc = events(tmp_path)
    assert [(e.step, e.width, e.height) for e in acc.Images("samples")] == [(5, 22, 22)]  # 2x2 tiles, 2 px gaps
    assert [(e.step, e.width, e.height) for e in acc.Images("grid")] == [(6, 22, 22)]
    import io

    import numpy as np
    from PIL import Image

    stored = Image.open(io.BytesIO(acc.Images("samples")[0].encoded_image_string)).convert("RGB")
    assert np.array_equal(np.asarray(stored), np.asarray(make_grid(batch).convert("RGB"))), "pixels changed"


# -- validation -----------------------------------------------------------------------------------


def test_unknown_logger_names_the_known_ones():
    with pytest.raises(PluginError) as e:
        validate_recipe({**RECIPE, "log": ["jsonl", "wandb"]})
    assert str(e.value) == "log.1: unknown logger 'wandb'; registered loggers: csv, jsonl, tensorboard"


def test_bad_logger_params_and_repeats_are_refused():
    with pytest.raises(ConfigError, match=r"log\.0\.params\.flush: unknown key"):
        validate_recipe({**RECIPE, "log": [{"name": "tensorboard", "params": {"flush": 1}}]})
    with pytest.raises(ConfigError, match=r"log\.0\.params\.subdir"):
        validate_recipe({**RECIPE, "log": [{"name": "tensorboard", "params": {"subdir": "../../elsewhere"}}]})
    with pytest.raises(ConfigError, match="listed twice"):
        validate_recipe({**RECIPE, "log": ["csv", "csv"]})


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import yaml

    from genfw.cli import app

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(PluginError, match=re.escape("pip install 'genfw[tensorboard]'")):
        validate_recipe({**RECIPE, "log": ["tensorboard"]})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    result = CliRunner().invoke(app, ["validate", str(recipe), "--set", "log=[jsonl, tensorboard]"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "log.1: logger 'tensorboard' needs the tensorboard package" in lines[0], result.output
    assert "genfw[tensorboard]" in lines[0]


# -- failure isolation, ranks ---------------------------------------------------------------------


class Flaky(Logger):
    """Fails on its second write."""

    calls = 0

    def log_scalars(self, step, scalars):
        type(self).calls += 1
        if type(self).calls == 2:
            raise OSError(28, "No space left on device")


class _FlakyPlugin:
    @hookimpl
    def genfw_register(self, registry):
        registry.register("logger", "flaky", Flaky, description="fails")


@pytest.fixture
def flaky():
    registry = get_registry()
    registry.add_plugin(_FlakyPlugin(), name="flaky-test", dist="flaky-test")
    Flaky.calls = 0
    yield
    registry.remove_plugin("flaky-test")


def test_a_failing_logger_is_warned_about_once_and_training_goes_on(tmp_path, data, flaky, capsys):
    Trainer(Regressor(), data, SPEC.model_copy(update={"steps": 8}), tmp_path, log=["flaky", "jsonl"]).fit()
    err = capsys.readouterr().err
    assert err.count("logger 'flaky' failed to log scalars") == 1 and "No space left on device" in err
    assert Flaky.calls == 2, "a failed logger must be switched off"
    assert sorted(read_jsonl(tmp_path)["loss/main"]) == [2, 4, 6, 8], "the other loggers keep logging"
    assert (tmp_path / "train_state.safetensors").exists()


def test_only_rank_0_logs(tmp_path, monkeypatch):
    from genfw import dist

    monkeypatch.setattr(dist, "is_main", lambda: False)
    loggers = LoggerSet(["jsonl", "csv", "tensorboard"], str(tmp_path / "prior0"))
    loggers.open(0)
    loggers.log_scalars(1, {"loss/main": 1.0})
    loggers.log_image(1, "samples", torch.zeros(3, 4, 4))
    loggers.close()
    assert not (tmp_path / "prior0").exists()


def test_a_foreign_csv_is_never_overwritten(tmp_path, capsys):
    folder = tmp_path / "prior0"
    folder.mkdir()
    (folder / "log.csv").write_text("my,own\n1,2\n")
    loggers = LoggerSet(["csv", "jsonl"], str(folder))
    loggers.open(0)
    loggers.log_scalars(1, {"loss/main": 1.0})
    loggers.close()
    assert (folder / "log.csv").read_text() == "my,own\n1,2\n"
    assert "logger 'csv' could not start" in capsys.readouterr().err
    assert read_jsonl(folder) == {"loss/main": {1: 1.0}}


def test_csv_widens_its_header_when_a_tag_appears_late(tmp_path):
    loggers = LoggerSet(["csv"], str(tmp_path))
    loggers.log_scalars(1, {"loss/main": 1.0})
    loggers.log_scalars(2, {"loss/main": 0.5, "loss/discriminator": 0.25})
    loggers.close()
    assert (tmp_path / "log.csv").read_text() == "step,loss/main,loss/discriminator\n1,1.0,\n2,0.5,0.25\n"


# -- the plugin guide's example -------------------------------------------------------------------


class StandInWandb:
    """Records what the docs' W&B example sends (genfw's tests install no wandb and reach no network)."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1

    class Image:
        def __init__(self, array):
            assert array.dtype.name == "uint8" and array.ndim in (2, 3)
            self.array = array


def test_docs_logger_example_passes_conformance(tmp_path, monkeypatch):
    doc = Path(__file__).parents[1] / "docs" / "writing-plugins.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    source = next(b for b in blocks if "(Logger)" in b and "def genfw_register" in b)
    path = tmp_path / "genfw_wandb_doc.py"
    path.write_text(source)
    wandb = StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    spec = importlib.util.spec_from_file_location("genfw_wandb_doc", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "genfw_wandb_doc", module)
    spec.loader.exec_module(module)

    def read_back(directory):
        out = {}
        for step, data in wandb.logged:
            for tag, value in data.items():
                if not isinstance(value, StandInWandb.Image):
                    out.setdefault(tag, {})[step] = value
        return out

    check_logger(module.WandbLogger, {"project": "demo"}, read_back=read_back)
    assert len(wandb.inits) == 3 and wandb.finished == 3
    assert len({i["id"] for i in wandb.inits}) == 1, "a resumed or continued stage continues its W&B run"
    assert wandb.inits[0]["project"] == "demo" and wandb.inits[0]["resume"] == "allow"
    assert [step for step, data in wandb.logged if "samples" in data] == [2, 3, 4, 5, 5]
    with pytest.raises(PluginError, match="pip install wandb"):
        monkeypatch.setitem(sys.modules, "wandb", None)
        module.WandbLogger.check_available()
