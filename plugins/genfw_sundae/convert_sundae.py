"""Convert a megapixel-SUNDAE prior (McKinney & Willcocks 2022; vvvm23/sundae-vqgan) into genfw.

Its ``train.py`` trains a ``HourglassTransformerLM`` with ptpt, whose ``Trainer.save_checkpoint``
writes ``checkpoint-NNNNNNN.pt`` = ``{"net": state_dict, "opt", "lr_scheduler", "scaler",
"nb_examples", "nb_updates"}``. The result is a genfw ``sundae`` prior over an ``hourglass``
backbone with the authors' behaviour where genfw's differs, each an ``hourglass`` param:

* rotary positions on the first head only (``rotary_heads: first``): their code rotates the
  first ``dim_head`` features of all heads' queries/keys before splitting heads;
* the resampling attention groups k raster-consecutive tokens (``resampling_groups: raster``),
  while the linear resampling uses 2D patches; and attends to the raw (not normalised) tokens
  (``resampling_context_norm: false``);
* rotary ``max_freq`` 16 (their ``int(sqrt(256))``, the default sequence length of every stage
  but the valley) and ``int(sqrt(valley tokens))`` in the valley (``valley_rotary_max_freq``).

Their ``to_q``/``to_kv`` weights are stacked into genfw's one q/k/v projection, and the feature
order of the linear down/up-sampling (``(d sh sw)`` there, ``(sh sw d)`` here) is permuted.
Dropped and listed: the rotary ``freqs`` buffers (recomputed; checked against the file first),
and the optimizer, scheduler and AMP-scaler state. The VQ-GAN is a taming-transformers
checkpoint: convert it with ``genfw convert taming``.

The dimensions are not in the checkpoint: ``--config`` takes the experiment's TOML (``[data]
vocab_size, sequence_length``, ``[vqgan] latent_shape``, ``[net]``, ``[sampling]``, ``unroll_steps``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from genfw import convert as core
from genfw.errors import CheckpointError, ConfigError

FORMAT = "megapixel-SUNDAE HourglassTransformerLM"
TOP_MAX_FREQ = 16  # int(sqrt(256)): pre/post/resampling layers keep the default max_seq_len of 256
HEAD_DIM = 64  # dim_head is not configurable in their train.py


def _section(cfg: dict[str, Any], section: str) -> dict[str, Any]:
    value = cfg.get(section)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"the SUNDAE config's [{section}] is a {type(value).__name__}, not a table of settings")
    return value


def _get(cfg: dict[str, Any], section: str, key: str, default: Any = None) -> Any:
    value = _section(cfg, section).get(key, default)
    if value is None:
        raise ConfigError(f"the SUNDAE config lacks [{section}] {key}")
    return value


def hyper_parameters(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The fields of their TOML this converter reads, flattened; ``overrides`` use ``section.key`` names."""
    h = {
        "unroll_steps": cfg.get("unroll_steps", 2),
        "data.vocab_size": _get(cfg, "data", "vocab_size"), "data.sequence_length": _get(cfg, "data", "sequence_length"),
        "vqgan.latent_shape": _section(cfg, "vqgan").get("latent_shape"),
        "net.type": _get(cfg, "net", "type", "hourglass"), "net.dim": _get(cfg, "net", "dim"),
        "net.nb_heads": _get(cfg, "net", "nb_heads"), "net.shorten_factor": _get(cfg, "net", "shorten_factor"),
        "net.depth": _get(cfg, "net", "depth"), "net.use_rotary": _get(cfg, "net", "use_rotary", False),
        "net.conditional": _get(cfg, "net", "conditional", False),
        "net.num_classes": _section(cfg, "net").get("num_classes", 0),
    }
    sampling = _section(cfg, "sampling")
    for theirs, default in (("steps", 100), ("temperature", 1.0), ("end_temperature", None),
                            ("sample_proportion", 0.5), ("end_sample_proportion", None)):
        h[f"sampling.{theirs}"] = sampling.get(theirs, default)
    bad = sorted(set(overrides) - set(h))
    if bad:
        raise ConfigError(f"--set {bad[0]}: not a SUNDAE config field this converter reads ({', '.join(sorted(h))})")
    h.update(overrides)
    return h


def _params(h: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    if h["net.type"] != "hourglass":
        raise ConfigError(f"[net] type '{h['net.type']}': only the hourglass network converts")
    if not h["net.use_rotary"]:
        raise ConfigError("[net] use_rotary = false (learned positions): genfw's hourglass has rotary positions only")
    depth = [int(d) for d in h["net.depth"]]
    if len(depth) != 3:
        raise ConfigError(f"[net] depth {depth}: expected [pre, valley, post]")
    for key in ("net.shorten_factor", "data.sequence_length", "data.vocab_size", "net.dim", "net.nb_heads"):
        if isinstance(h[key], bool) or int(h[key]) < 1:
            section, name = key.split(".")
            raise ConfigError(f"[{section}] {name} = {h[key]!r}: must be a positive integer")
    if any(d < 0 for d in depth):
        raise ConfigError(f"[net] depth {depth}: layer counts cannot be negative")
    k, n = int(h["net.shorten_factor"]), int(h["data.sequence_length"])
    latent = h["vqgan.latent_shape"] or [math.isqrt(n)] * 2
    if len(latent) != 2 or latent[0] != latent[1] or latent[0] * latent[1] != n:
        raise ConfigError(f"latent_shape {latent} and sequence_length {n}: their model needs a square grid of "
                          "sequence_length tokens")
    backbone = {"name": "hourglass", "params": {
        "dim": int(h["net.dim"]), "depth": depth, "shorten_factors": [k], "resampling": "2d",
        "attention_resampling": True, "heads": int(h["net.nb_heads"]), "head_dim": HEAD_DIM, "mlp_ratio": 4.0,
        "dropout": 0.0, "qkv_bias": False, "norm_eps": 1e-5, "rotary_max_freq": float(TOP_MAX_FREQ),
        "valley_rotary_max_freq": float(math.isqrt(n // k)), "rotary_heads": "first",
        "resampling_groups": "raster", "resampling_context_norm": False}}
    num_classes = int(h["net.num_classes"]) if h["net.conditional"] else 0
    construct = {"codebook_size": int(h["data.vocab_size"]), "grid": [int(v) for v in latent],
                 "num_classes": num_classes, "context": [], "backbone": backbone}
    params = {"unroll_steps": int(h["unroll_steps"]), "label_drop": 0.0}
    t0, p0 = h["sampling.temperature"], h["sampling.sample_proportion"]
    sampler = {"steps": int(h["sampling.steps"]), "temperature": float(t0),
               "temperature_end": float(h["sampling.end_temperature"] if h["sampling.end_temperature"] is not None else t0),
               "sample_proportion": float(p0),
               "sample_proportion_end": float(h["sampling.end_sample_proportion"]
                                              if h["sampling.end_sample_proportion"] is not None else p0),
               "min_steps": 10}
    return params, construct, sampler


def _pixel_freqs(max_freq: int, n: int) -> torch.Tensor:
    """rotary-embedding-torch's 'pixel' frequencies: linspace(1, max_freq / 2, n) * pi."""
    return torch.linspace(1.0, max_freq / 2, n) * math.pi


def convert_sundae(src: str | os.PathLike, out: str | os.PathLike, *, config: str | None = None,
                   overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """Read ptpt's ``checkpoint-NNNNNNN.pt`` of a SUNDAE hourglass at ``src``, write a genfw prior to ``out``."""
    source = os.fspath(src)
    obj = core.read_torch_file(src)
    training_state: list[str] = []
    if isinstance(obj, dict) and isinstance(obj.get("net"), dict):
        training_state = [k for k in obj if k != "net"]
        obj = obj["net"]
    state = core.tensor_dict(obj, source, FORMAT)
    if "token_emb.weight" not in state or "to_logits.weight" not in state:
        hint = (" (it looks like a VQ-GAN: genfw convert taming)" if "encoder.conv_in.weight" in state else
                " (it looks like Unleashing Transformers: genfw convert unleashing)"
                if any(k.startswith(("_denoise_fn.", "ae.")) for k in state) else "")
        raise CheckpointError(f"{source} is not a {FORMAT} checkpoint: it lacks token_emb.weight / to_logits.weight{hint}")
    if config is None:
        raise ConfigError(f"{source} holds no dimensions: pass --config with the experiment's TOML (config/<dataset>/*.toml)")
    h = hyper_parameters(core.read_config(config), overrides or {})
    try:
        params, construct, sampler = _params(h)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"invalid SUNDAE config: {type(e).__name__}: {e}") from None
    bp = construct["backbone"]["params"]
    k, dim = bp["shorten_factors"][0], bp["dim"]
    side = math.isqrt(k)

    keys = core.KeyMap(state, source, FORMAT)
    b, t = "backbone.", "transformer."
    keys.copy("token_emb.weight", f"{b}embed.tokens.weight")
    if construct["num_classes"]:
        keys.copy("class_emb.weight", f"{b}embed.classes.weight")
    if keys.has("pos_emb.weight"):
        raise CheckpointError(f"{source} has learned positions (pos_emb.weight): genfw's hourglass has rotary only")

    def self_block(theirs: str, ours: str) -> None:
        keys.copy_prefix(f"{theirs}.0.norm", f"{ours}.norm1")
        q, kv = keys.take(f"{theirs}.0.fn.to_q.weight", 2), keys.take(f"{theirs}.0.fn.to_kv.weight", 2)
        keys.put(f"{ours}.attn.qkv.weight", torch.cat((q, kv), 0), f"{theirs}.0.fn.to_q/to_kv.weight")
        keys.copy_prefix(f"{theirs}.0.fn.to_out", f"{ours}.attn.proj")
        feed_forward(theirs, ours)

    def cross_block(theirs: str, ours: str) -> None:
        keys.copy_prefix(f"{theirs}.0.norm", f"{ours}.norm_q")
        keys.copy(f"{theirs}.0.fn.to_q.weight", f"{ours}.attn.q.weight")
        keys.copy(f"{theirs}.0.fn.to_kv.weight", f"{ours}.attn.kv.weight")
        keys.copy_prefix(f"{theirs}.0.fn.to_out", f"{ours}.attn.proj")
        feed_forward(theirs, ours)

    def feed_forward(theirs: str, ours: str) -> None:
        keys.copy_prefix(f"{theirs}.1.norm", f"{ours}.norm2")
        keys.copy_prefix(f"{theirs}.1.fn.0", f"{ours}.mlp.fc1")
        keys.copy_prefix(f"{theirs}.1.fn.3", f"{ours}.mlp.fc2")

    def rotary(stack: str, max_freq: int) -> None:
        name = f"{t}{stack}.rotary_pos_emb.freqs"
        if keys.has(name):  # persistent in rotary-embedding-torch 0.1.x; recomputed by genfw
            got, want = keys.state[name], _pixel_freqs(max_freq, HEAD_DIM // 4)
            if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-5, atol=1e-5):
                raise CheckpointError(f"{source}: rotary frequencies '{name}' {got.flatten()[:3].tolist()}... are not "
                                      f"linspace(1, {max_freq}/2, {HEAD_DIM // 4})*pi as the config implies")
            keys.drop(lambda key, name=name: key == name)

    pre, valley, post = bp["depth"]
    for i in range(pre):
        self_block(f"{t}pre_transformer.layers.{i}", f"{b}body.pre.{i}")
    for i in range(valley):
        self_block(f"{t}valley_transformer.layers.{i}", f"{b}body.inner.pre.{i}")
    for i in range(post):
        self_block(f"{t}post_transformer.layers.{i}", f"{b}body.post.{i}")
    cross_block(f"{t}attn_resampling_pre_valley.layers.0", f"{b}body.down_attention")
    cross_block(f"{t}attn_resampling_post_valley.layers.0", f"{b}body.up_attention")
    for stack in ("pre_transformer", "post_transformer", "attn_resampling_pre_valley", "attn_resampling_post_valley"):
        rotary(stack, TOP_MAX_FREQ)
    rotary("valley_transformer", int(bp["valley_rotary_max_freq"]))
    # linear resampling: their features are ordered (d sh sw), genfw's (sh sw d)
    down = keys.take(f"{t}downsample.proj.weight", 2)
    if down.shape[1] != dim * k:
        raise CheckpointError(f"{source}: tensor '{t}downsample.proj.weight' has shape {tuple(down.shape)} but the "
                              f"config describes ({dim}, {dim * k})")
    keys.put(f"{b}body.down.weight", down.reshape(-1, dim, side, side).permute(0, 2, 3, 1).reshape(down.shape[0], -1),
             f"{t}downsample.proj.weight")
    keys.copy(f"{t}downsample.proj.bias", f"{b}body.down.bias")
    up_w, up_b = keys.take(f"{t}upsample.proj.weight", 2), keys.take(f"{t}upsample.proj.bias", 1)
    if up_w.shape[0] != dim * k or up_b.shape[0] != dim * k:
        raise CheckpointError(f"{source}: tensor '{t}upsample.proj.weight' has shape {tuple(up_w.shape)} but the "
                              f"config describes ({dim * k}, {dim})")
    keys.put(f"{b}body.up.weight", up_w.reshape(dim, side, side, -1).permute(1, 2, 0, 3).reshape(dim * k, -1),
             f"{t}upsample.proj.weight")
    keys.put(f"{b}body.up.bias", up_b.reshape(dim, side, side).permute(1, 2, 0).reshape(-1), f"{t}upsample.proj.bias")
    keys.copy_prefix(f"{t}norm_out", f"{b}norm")
    keys.copy_prefix("to_logits", f"{b}head")
    model = core.build("prior", "sundae", params, construct, keys)
    keys.dropped += training_state
    core.save(out, model, "vvvm23/sundae-vqgan", source, keys, extra={"sampler": sampler})
    return model


convert_sundae.Params = core.hyper_parameters_model("SundaeParams", {
    "unroll_steps": 2, "data.vocab_size": 1024, "data.sequence_length": 256, "vqgan.latent_shape": [16, 16],
    "net.type": "hourglass", "net.dim": 1024, "net.nb_heads": 8, "net.shorten_factor": 4, "net.depth": [2, 12, 2],
    "net.use_rotary": True, "net.conditional": False, "net.num_classes": 0, "sampling.steps": 100,
    "sampling.temperature": 1.0, "sampling.end_temperature": 1.0, "sampling.sample_proportion": 0.5,
    "sampling.end_sample_proportion": 0.5,
}, doc="Fields of megapixel-SUNDAE's experiment TOML ([section] key as section.key); each optional: from --config")
