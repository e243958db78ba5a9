"""What plugin authors rely on: component swaps, provenance, params discovery, messages."""


from genfw.config import apply_overrides, validate_recipe

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
