"""What plugin authors rely on: component swaps, provenance, params discovery, messages."""


import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

from genfw import build, hookimpl, load, save
from genfw.checkpoint import read
from genfw.cli import app
from genfw.config import apply_overrides, validate_recipe
from genfw.errors import ConfigError, PluginError
from genfw.interfaces import Backbone
from genfw.interfaces import Params as BaseParams
from genfw.nn import GridEmbedding

BASE = {
    "name": "t",
    "data": {"name": "synthetic", "params": {"resolution": 8}},
    "tokenizer": {"name": "pixels", "params": {"levels": 4}},
    "prior": {"name": "sundae", "params": {"unroll_steps": 3},
              "backbone": {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}},
}


def test_swapping_a_component_drops_the_old_params_with_a_note():
    notes: list[str] = []
    raw = apply_overrides(BASE, ["prior.name=absorbing"], notes)
    assert raw["prior"]["params"] == {} and raw["prior"]["backbone"] == BASE["prior"]["backbone"]
    assert len(notes) == 1 and "unroll_steps" in notes[0] and "'sundae' -> 'absorbing'" in notes[0]
    validate_recipe(raw)  # sundae's unroll_steps would be an unknown key for absorbing
    # params given explicitly in the same command survive, whatever their order
    raw = apply_overrides(BASE, ["prior.params.timesteps=8", "prior.name=absorbing"], [])
    assert raw["prior"]["params"] == {"timesteps": 8}
    raw = apply_overrides(BASE, ["prior.name=absorbing", "prior.params.timesteps=8"], [])
    assert raw["prior"]["params"] == {"timesteps": 8}
    # nested component: the backbone's params go with its name
    notes = []
    raw = apply_overrides(BASE, ["prior.backbone.name=hourglass"], notes)
    assert raw["prior"]["backbone"] == {"name": "hourglass", "params": {}} and "(depth, dim, heads)" in notes[0]
    # the same name again changes nothing
    notes = []
    assert apply_overrides(BASE, ["prior.name=sundae"], notes) == BASE and notes == []


# --------------------------------------------------------------------------------------------
# discoverable params: genfw plugins --params, genfw schema


RECIPES = Path(__file__).parents[1] / "recipes"
SHIPPED = [p for p in sorted(RECIPES.rglob("*.yaml")) if "ablations" not in p.parts or p.name.startswith("base_")]


def test_plugins_params_prints_type_default_and_description():
    result = CliRunner().invoke(app, ["plugins", "--params", "transformer"], terminal_width=200)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│ heads" in line)
    assert "int (>= 1)" in row and "8" in row and "attention heads" in row
    prior = CliRunner().invoke(app, ["plugins", "--params", "prior:sundae"], terminal_width=200)
    assert "sample.params" in prior.output and "temperature_end" in prior.output
    missing = CliRunner().invoke(app, ["plugins", "--params", "nosuch"])
    assert missing.exit_code == 1 and "no component is named 'nosuch'" in missing.output


def test_schema_validates_every_shipped_recipe_and_rejects_typos(tmp_path):
    import jsonschema

    out = tmp_path / "recipe.schema.json"
    result = CliRunner().invoke(app, ["schema", "-o", str(out)])
    assert result.exit_code == 0, result.output
    schema = json.loads(out.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert len(SHIPPED) >= 10
    for path in SHIPPED:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors[:3]}"
    base = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    for key, change in [("prior.params", {"unrol_steps": 2}), ("prior.backbone.params", {"dimm": 8}),
                        ("sample.params", {"stepz": 3}), ("prior", {"name": "nosuch"}),
                        ("tokenizer.params", {"factor": "four"})]:
        raw = copy.deepcopy(base)
        node = raw
        for k in key.split("."):
            node = node[k]
        node.update(change)
        assert not validator.is_valid(raw), f"{key} {change} should not validate"


# --------------------------------------------------------------------------------------------
# provenance: nested components record distribution, version and validated params


def _toy_backbone(default_width: int) -> type:
    class Toy(Backbone):
        """Embeddings, the grid mean added everywhere (bidirectional), a linear head."""

        class Params(BaseParams):
            width: int = Field(default_width, ge=1, description="embedding width")

        def __init__(self, params=None, **construct):
            super().__init__(params, **construct)
            self.embed = GridEmbedding(self.vocab_size, self.params.width, self.num_classes, self.context)
            self.head = nn.Linear(self.params.width, self.out_size)

        def forward(self, tokens, labels=None, context=None, causal=False):
            x = self.embed(tokens, labels, context)
            return self.head(x + x.mean((1, 2), keepdim=True))

    return Toy


class _ToyPlugin:
    def __init__(self, cls):
        self.cls = cls

    @hookimpl
    def genfw_register(self, registry):
        registry.register("backbone", "toy", self.cls, description="toy backbone")


@pytest.fixture
def toy_plugin(registry):
    def install(default_width: int, version: str) -> None:
        registry.remove_plugin("toy")
        registry.add_plugin(_ToyPlugin(_toy_backbone(default_width)), name="toy", dist="genfw-toy", version=version)

    yield install
    registry.remove_plugin("toy")


def test_nested_backbone_provenance_survives_a_changed_default(tmp_path, toy_plugin):
    toy_plugin(default_width=8, version="1.0")
    prior = build("prior", "sundae", {"unroll_steps": 2}, codebook_size=6, grid=[3, 3], num_classes=2,
                  backbone={"name": "toy"})
    path = tmp_path / "prior.safetensors"
    save(path, prior)
    (comp,) = read(path)[1]["components"]
    assert comp["construct"]["backbone"] == {"name": "toy", "params": {"width": 8}}  # defaults filled in
    assert comp["nested"] == [{"path": "backbone", "kind": "backbone", "name": "toy", "dist": "genfw-toy",
                               "version": "1.0", "params": {"width": 8}}]
    shown = CliRunner().invoke(app, ["inspect", str(path)])
    assert "model/backbone" in shown.output and "genfw-toy" in shown.output
    codes = torch.randint(0, 6, (4, 3, 3))
    labels = torch.tensor([0, 1, 0, 1])
    prior.eval()
    with torch.no_grad():
        before = prior.backbone(codes, labels)
    toy_plugin(default_width=16, version="2.0")  # the plugin raises its default
    loaded = load(path)
    assert loaded.backbone.params.width == 8 and loaded.backbone._genfw_version == "2.0"
    with torch.no_grad():
        assert torch.equal(loaded.backbone(codes, labels), before)
    from genfw.registry import get_registry

    get_registry().remove_plugin("toy")  # uninstalled: the error names the distribution
    with pytest.raises(PluginError, match=r"needs backbone 'toy' from the distribution 'genfw-toy' \(version 1.0\), "
                                          r"which is not installed: pip install genfw-toy"):
        load(path)


# --------------------------------------------------------------------------------------------
# check_backbone catches what it claims to; declared conditioning is enforced


class _Local(Backbone):
    """Each position sees only its own token (plus labels/context): not bidirectional."""

    def __init__(self, params=None, **construct):
        super().__init__(params, **construct)
        self.embed = GridEmbedding(self.vocab_size, 8, self.num_classes, self.context)
        self.head = nn.Linear(8, self.out_size)

    def forward(self, tokens, labels=None, context=None, causal=False):
        return self.head(self.embed(tokens, labels, context))


class _DeafToLabels(_toy_backbone(8)):
    def forward(self, tokens, labels=None, context=None, causal=False):
        return super().forward(tokens, None, context)


class _NoLabels(_toy_backbone(8)):
    uses_labels = False


def test_check_backbone_catches_a_backbone_that_is_not_bidirectional_or_ignores_labels():
    from genfw.testing import check_backbone

    with pytest.raises(AssertionError, match="must be bidirectional"):
        check_backbone(_Local)
    with pytest.raises(AssertionError, match="labels do not change the logits"):
        check_backbone(_DeafToLabels, {"width": 8})
    check_backbone(_NoLabels, {"width": 8})  # declared: checked without labels
    check_backbone(_toy_backbone(8), {"width": 8})


def test_a_backbone_without_labels_is_refused_for_class_conditional_recipes(registry):
    registry.add_plugin(_ToyPlugin(_NoLabels), name="nolabels", dist="genfw-nolabels", version="1.0")
    try:
        raw = apply_overrides(BASE, ["prior.backbone.name=toy"], [])
        with pytest.raises(ConfigError, match="cannot be conditioned on labels.*class_conditional: false"):
            validate_recipe(raw)
        validate_recipe({**raw, "class_conditional": False})
        with pytest.raises(ConfigError, match="cannot be conditioned on labels"):
            build("backbone", "toy", {}, vocab_size=4, out_size=4, grid=[2, 2], num_classes=3)
    finally:
        registry.remove_plugin("nolabels")


def test_corrupt_nested_metadata_is_one_clear_error(tmp_path):
    from helpers import edit_meta

    from genfw.errors import CheckpointError

    prior = build("prior", "sundae", {}, codebook_size=4, grid=[2, 2],
                  backbone={"name": "transformer", "params": {"dim": 8, "depth": 1, "heads": 2}})
    path = tmp_path / "p.safetensors"
    save(path, prior)
    for bad in ([{"kind": ["backbone"], "name": "transformer"}], "backbone", [{"name": "transformer"}]):
        edit_meta(path, lambda meta, bad=bad: meta["components"][0].update(nested=bad))
        with pytest.raises(CheckpointError, match="corrupt 'nested' metadata"):
            load(path)
