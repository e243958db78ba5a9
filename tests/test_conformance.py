"""genfw.testing on every registered built-in component, parametrised over the registry.

A new built-in component must add a tiny configuration here, or this test fails.
"""

import os

import pytest

from genfw.registry import get_registry
from genfw.testing import check_backbone, check_dataset, check_logger, check_prior, check_tokenizer

os.environ.setdefault("GENFW_PLUGINS", "genfw")

TINY_BACKBONE = {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}
TINY = {
    ("tokenizer", "pixels"): {"levels": 8},
    ("tokenizer", "vqvae"): {"factor": 4, "hidden_channels": 16, "residual_channels": 8, "num_res_blocks": 1,
                             "codebook_size": 16, "embed_dim": 8},
    ("tokenizer", "vqvae2"): {"strides": [2, 2], "hidden_channels": 16, "residual_channels": 8,
                              "num_res_blocks": 1, "codebook_size": 16, "embed_dim": 8},
    ("tokenizer", "vqgan"): {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                             "z_channels": 8, "embed_dim": 8, "codebook_size": 16, "perceptual_weight": 0.0,
                             "disc_layers": 2, "disc_ndf": 8},
    ("tokenizer", "fsq"): {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                           "z_channels": 8, "levels": [4, 4], "perceptual_weight": 0.0, "disc_layers": 2, "disc_ndf": 8},
    ("tokenizer", "lfq"): {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                           "z_channels": 8, "codebook_bits": 4, "perceptual_weight": 0.0, "disc_layers": 2,
                           "disc_ndf": 8},
    ("backbone", "transformer"): {"dim": 16, "depth": 2, "heads": 2},
    ("backbone", "hourglass"): {"dim": 16, "depth": [1, 1, 1], "heads": 2, "head_dim": 8},
    ("prior", "sundae"): ({"unroll_steps": 2}, {"steps": 6, "min_steps": 2}),
    ("prior", "absorbing"): ({"timesteps": 16, "nll_timesteps": 4}, {"steps": 8}),
    ("prior", "autoregressive"): ({}, {}),
    ("prior", "maskgit"): ({"nll_ratios": 2}, {"steps": 4}),
    ("dataset", "synthetic"): {"size": 6, "resolution": 8},
    ("dataset", "mnist"): {"limit": 20},
    ("dataset", "folder"): None,  # covered by tests/test_data.py and the bad-input suite (needs files)
    ("logger", "jsonl"): {},  # read back value by value in tests/test_loggers.py
    ("logger", "csv"): {},
    ("logger", "tensorboard"): {"flush_secs": 5},
}
BUILTINS = [(e.kind, e.name) for e in get_registry().entries() if e.dist == "genfw" and e.kind != "converter"]


def test_every_builtin_has_a_tiny_configuration():
    assert set(BUILTINS) <= set(TINY), f"add a tiny config for {sorted(set(BUILTINS) - set(TINY))}"


@pytest.mark.parametrize(("kind", "name"), BUILTINS, ids=lambda x: str(x))
def test_builtin_conforms(kind, name):
    config = TINY[(kind, name)]
    if kind == "tokenizer":
        check_tokenizer(name, config, channels=1, resolution=(16, 16))
    elif kind == "backbone":
        check_backbone(name, config)
    elif kind == "prior":
        params, sampler = config
        check_prior(name, params, backbone=TINY_BACKBONE, sampler=sampler)
    elif kind == "logger":
        check_logger(name, config)
    elif kind == "dataset" and config is not None:
        check_dataset(name, config)
