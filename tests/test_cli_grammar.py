"""One override grammar for every command, --debug everywhere, completion, one name for outputs."""

import pytest
import torch
import typer
import yaml
from test_python_api import tiny_bundle
from typer.testing import CliRunner

from genfw.cli import app
from genfw.config import apply_overrides, parse_override
from genfw.errors import ConfigError, GenfwError

BASE = {
    "name": "g",
    "data": {"name": "synthetic", "params": {"size": 16, "resolution": 4, "num_classes": 2}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 2},
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
    "train": {"prior": {"steps": 3, "batch_size": 4, "warmup_steps": 2}},
    "sample": {"n": 4, "params": {"steps": 3}},
}

# (override items on the command line, what the recipe must look like afterwards)
GRAMMAR = [
    (["train.prior.steps=10"], lambda r: r["train"]["prior"]["steps"] == 10),
    (["--set", "train.prior.steps=10"], lambda r: r["train"]["prior"]["steps"] == 10),
    (["-s", "train.prior.lr=1e-3"], lambda r: r["train"]["prior"]["lr"] == 1e-3),
    (["~train.prior.warmup_steps"], lambda r: "warmup_steps" not in r["train"]["prior"]),
    (["sample.labels=[1, 0]", "seed=5"], lambda r: r["sample"]["labels"] == [1, 0] and r["seed"] == 5),
    (["--set", "seed=1", "seed=2"], lambda r: r["seed"] == 2),  # --set first, then positional
    (["sample.params={steps: 7}"], lambda r: r["sample"]["params"] == {"steps": 7}),
    (["prior.backbone.params.depth=2", "~prior.params"],
     lambda r: r["prior"]["backbone"]["params"]["depth"] == 2 and "params" not in r["prior"]),
]


@pytest.fixture
def files(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    ablation = tmp_path / "a.yaml"
    ablation.write_text(yaml.safe_dump({"base": "r.yaml", "variants": {"one": {"sample.n": 2}}}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(BASE))
    return {"run": ["run", str(recipe), "--dry-run"], "validate": ["validate", str(recipe)],
            "ablate": ["ablate", str(ablation)], "eval": ["eval", str(run_dir)]}


class Captured(GenfwError):
    pass


@pytest.mark.parametrize("items,check", GRAMMAR, ids=[" ".join(i) for i, _ in GRAMMAR])
@pytest.mark.parametrize("command", ["run", "validate", "ablate", "eval"])
def test_one_grammar_for_every_recipe_command(files, monkeypatch, command, items, check):
    seen = []

    def capture(raw, *args, **kwargs):
        seen.append(raw)
        raise Captured("captured")

    for where in ("genfw.config.validate", "genfw.api", "genfw.ablate.plan"):  # where it is looked up
        monkeypatch.setattr(f"{where}.validate_recipe", capture)
    result = CliRunner().invoke(app, [*files[command], *items])
    assert "error: captured" in result.output, result.output
    assert check(seen[0]), seen[0]


SAMPLER = [
    (["steps=2"], {"steps": 2}),
    (["--steps", "2"], {"steps": 2}),
    (["--set", "steps=2"], {"steps": 2}),
    (["sample.params.steps=2"], {"steps": 2}),
    (["temperature=0.5", "~min_steps"], {"temperature": 0.5, "steps": 5}),
]


@pytest.mark.parametrize("items,expected", SAMPLER, ids=[" ".join(i) for i, _ in SAMPLER])
@pytest.mark.parametrize("command", ["sample", "inpaint"])
def test_sampler_overrides_in_the_same_grammar(tmp_path, monkeypatch, command, items, expected):
    bundle = tiny_bundle(tmp_path / "m.safetensors")  # stored sampler defaults: steps 5, min_steps 2
    seen = []

    def capture(*args, sampler=None, **kwargs):
        seen.append(sampler)
        raise Captured("captured")

    for where in ("genfw.sampling", "genfw.inpaint", "genfw.api"):  # where it is looked up
        monkeypatch.setattr(f"{where}.generate", capture)
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "i.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "m.png")
    args = {"sample": ["sample", str(bundle), "-n", "1"],
            "inpaint": ["inpaint", str(bundle), "--image", str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"),
                        "--label", "0"]}[command]
    result = CliRunner().invoke(app, [*args, *items])
    assert "error: captured" in result.output, result.output
    params = seen[0][0].model_dump()
    for key, value in expected.items():
        assert params[key] == value
    default_min_steps = type(seen[0][0])().min_steps
    assert params["min_steps"] == (default_min_steps if "~min_steps" in items else 2)


def test_parse_override_and_delete():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2], False)
    assert parse_override("~a.b") == ("a.b", None, True)
    assert parse_override("a='text: with colon'") == ("a", "text: with colon", False)
    assert parse_override("lr=1e-3") == ("lr", 1e-3, False) and parse_override("x=[unclosed")[1] == "[unclosed"
    for bad in ("a", "~a=1", "a..b=1", "=1"):
        with pytest.raises(ConfigError, match="expects key.path=value"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="nothing to delete"):
        apply_overrides(BASE, ["~train.prior.nope"])
    assert "levels" not in apply_overrides({"levels": [1, 2]}, ["~levels"])
    assert apply_overrides({"levels": [1, 2]}, ["~levels.0"]) == {"levels": [2]}


def test_validate_quickstart_with_a_positional_override():
    result = CliRunner().invoke(app, ["validate", "recipes/quickstart.yaml", "train.prior.steps=10"])
    assert result.exit_code == 0, result.output
    assert "recipe 'quickstart' is valid" in result.output


def _commands(group: typer.Typer, prefix=()):
    for info in group.registered_commands:
        yield [*prefix, info.name or info.callback.__name__.replace("_", "-")]
    for sub in group.registered_groups:
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


def test_every_command_takes_debug_and_writes_to_output(monkeypatch):
    commands = list(_commands(app))
    assert len(commands) >= 13 and ["recipes", "copy"] in commands
    writers = {"run", "sample", "inpaint", "export", "convert", "ablate", "assemble"}
    for cmd in commands:
        text = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200).output
        assert "--debug" in text, cmd
        if cmd[-1] in writers:
            assert "--output" in text and "--out " not in text and "--output-dir" not in text, cmd


def test_debug_after_the_command_and_from_the_environment(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.yaml")
    plain = CliRunner().invoke(app, ["validate", missing])
    assert plain.exit_code == 2 and "error: recipe not found" in plain.output and "Traceback" not in plain.output
    after = CliRunner().invoke(app, ["validate", missing, "--debug"])
    assert isinstance(after.exception, ConfigError)
    import genfw.cli

    monkeypatch.setitem(genfw.cli._state, "debug", False)
    monkeypatch.setenv("GENFW_DEBUG", "1")
    env = CliRunner().invoke(app, ["validate", missing])
    assert isinstance(env.exception, ConfigError)


def test_old_output_spellings_still_work(tmp_path):
    bundle = tiny_bundle(tmp_path / "m.safetensors")
    result = CliRunner().invoke(app, ["sample", str(bundle), "-n", "1", "--out", str(tmp_path / "old")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "old").glob("*.png"))) == 1


def test_shell_completion_can_be_installed():
    result = CliRunner().invoke(app, ["--show-completion", "bash"])
    assert result.exit_code == 0 and "_GENFW_COMPLETE" in result.output.upper()


def test_command_start_says_device_precision_and_threads(tmp_path):
    bundle = tiny_bundle(tmp_path / "m.safetensors")
    result = CliRunner().invoke(app, ["sample", str(bundle), "-n", "1", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0
    assert f"device cpu · precision fp32 · {torch.get_num_threads()} CPU threads" in result.output
