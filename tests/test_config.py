"""Recipe schema, overrides and validation: typos fail before work, naming the full path."""

from pathlib import Path

import pytest

from genfw.config import apply_overrides, load_recipe, load_yaml, validate_recipe
from genfw.errors import ConfigError, PluginError

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))
BASE = {
    "name": "t",
    "data": {"name": "synthetic", "params": {"resolution": 8}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
}


@pytest.mark.parametrize("path", [p for p in RECIPES if "ablations" not in p.parts], ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    assert path.read_text().lstrip().startswith("#"), "recipes open with a comment giving the command"
    assert "genfw " in path.read_text().splitlines()[0] or "genfw " in path.read_text()[:400]
    resolved = load_recipe(path)
    assert resolved.prior_specs


def test_misspelt_backbone_param_names_full_path_and_allowed_keys():
    raw = apply_overrides(BASE, ["prior.backbone.params.dimm=32"])
    with pytest.raises(ConfigError) as e:
        validate_recipe(raw)
    msg = str(e.value)
    assert "prior.backbone.params.dimm: unknown key" in msg and "allowed keys:" in msg and "dim" in msg


def test_unknown_component_lists_registered_names():
    raw = apply_overrides(BASE, ["prior.name=sundea"])
    with pytest.raises(PluginError) as e:
        validate_recipe(raw)
    assert "prior.name: unknown prior 'sundea'" in str(e.value) and "sundae" in str(e.value)


def test_set_overrides_change_what_is_validated():
    raw = apply_overrides(BASE, ["train.prior.steps=7", "prior.backbone.params.depth=3", "seed=5"])
    resolved = validate_recipe(raw)
    assert resolved.recipe.train.prior.steps == 7 and resolved.backbone_params[0].depth == 3
    assert resolved.recipe.seed == 5
    with pytest.raises(ConfigError, match="train.prior.steps"):
        validate_recipe(apply_overrides(BASE, ["train.prior.steps=-1"]))
    with pytest.raises(ConfigError, match="train.prior.stepz: unknown key"):
        validate_recipe(apply_overrides(BASE, ["train.prior.stepz=1"]))
    with pytest.raises(ConfigError, match="expects key.path=value"):
        apply_overrides(BASE, ["train.prior.steps"])


def test_out_of_range_param():
    with pytest.raises(ConfigError, match="tokenizer.params.levels"):
        validate_recipe(apply_overrides(BASE, ["tokenizer.params.levels=1"]))


def test_sample_params_are_validated_by_the_prior():
    with pytest.raises(ConfigError, match="sample.params.stepz"):
        validate_recipe(apply_overrides(BASE, ["sample.params.stepz=3"]))


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprior: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML at line") as e:
        load_yaml(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_per_level_priors_must_match_tokenizer_levels():
    raw = dict(BASE, prior={"levels": [BASE["prior"], BASE["prior"]]})
    with pytest.raises(ConfigError, match="2 entries but the tokenizer has 1"):
        validate_recipe(raw)


def test_required_plugin_versions(registry):
    validate_recipe(dict(BASE, plugins={"genfw": ">=0.1"}))
    with pytest.raises(ConfigError, match="genfw-maskgit"):
        validate_recipe(dict(BASE, plugins={"genfw-maskgit": ">=1"}))
    with pytest.raises(ConfigError, match="needs genfw>=99"):
        validate_recipe(dict(BASE, plugins={"genfw": ">=99"}))


def test_sampler_params_do_not_accept_training_params():
    # a nested `class SamplerParams(Params)` would silently inherit the prior's own Params
    with pytest.raises(ConfigError, match="sample.params.unroll_steps: unknown key"):
        validate_recipe(apply_overrides(BASE, ["sample.params.unroll_steps=2"]))
