"""Converters of the papers' own checkpoints, against the authors' code's outputs on fixed inputs.

The fixtures (``../shared/converters/``) are tiny random-weight checkpoints written by the
authors' code, with that code's outputs (codes, logits, decoded images). A converted genfw model
must give the same codes exactly and logits / images within 1e-4 (float32, CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import genfw
from genfw.cli import app
from genfw.errors import GenfwError

FIXTURES = Path(__file__).parents[1] / ".." / "shared" / "converters"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(),
                                reason=f"converter fixtures not found at {FIXTURES} (../shared is absent)")
ATOL = 1e-4
runner = CliRunner()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def one_line_error(args: list[str], *fragments: str) -> str:
    code, text = cli(*args)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert code != 0, text
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# VQ-VAE-2 (rosinality/vq-vae-2-pytorch)

RV = FIXTURES / "rv"


@pytest.fixture(scope="module")
def vqvae2(tmp_path_factory):
    out = tmp_path_factory.mktemp("rv") / "vqvae2.safetensors"
    code, text = cli("convert", "vqvae2", str(RV / "vqvae_001.pt"), "-o", str(out),
                     "--config", str(RV / "vqvae_config.json"), "--resolution", "32")
    assert code == 0, text
    return genfw.load(out), out


def test_vqvae2_matches_reference(vqvae2):
    model, _ = vqvae2
    ref = load_file(RV / "reference.safetensors")
    with torch.no_grad():
        top, bottom = model.encode(ref["images"])
        assert torch.equal(top, ref["id_t"]) and torch.equal(bottom, ref["id_b"])
        outs = model._quantize_all(ref["images"])
        assert max_diff(outs[1].quantized, ref["quant_t"]) < ATOL
        assert max_diff(outs[0].quantized, ref["quant_b"]) < ATOL
        decoded = model.decode([ref["id_t"], ref["id_b"]])
        assert max_diff(decoded, ref["decoded"]) < ATOL
        assert max_diff(model.decode([ref["random_id_t"], ref["random_id_b"]]), ref["random_decoded"]) < ATOL
        assert max_diff(model(ref["images"])[0], ref["forward_out"]) < ATOL
    # the EMA state came along (training can continue): embedding == ema_sum / smoothed count
    q = model.quantize[1]
    total = q.ema_count.sum()
    smoothed = (q.ema_count + q.ema_eps) / (total + q.codebook_size * q.ema_eps) * total
    assert max_diff(q.ema_sum / smoothed[:, None], q.embedding.weight) < 1e-5


def test_vqvae2_shapes_alone_suffice(tmp_path):
    """Without --config every constructor argument is read off the tensors."""
    out = tmp_path / "m.safetensors"
    from genfw_vq.convert_vqvae2 import convert_vqvae2

    model = convert_vqvae2(RV / "vqvae_001.pt", out, overrides={"resolution": 32})
    assert model.params.hidden_channels == 32 and model.params.residual_channels == 16
    assert model.params.codebook_size == 32 and model.params.embed_dim == 16
    meta = json.loads(load_file_meta(out))
    assert meta["extra"]["converted_from"] == "rosinality/vq-vae-2-pytorch"
    assert sorted(meta["extra"]["dropped"]) == []


def load_file_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()["genfw"]


def test_vqvae2_bad_files(tmp_path):
    state = torch.load(RV / "vqvae_001.pt", map_location="cpu", weights_only=True)
    out = str(tmp_path / "o.safetensors")
    # a missing tensor
    partial = dict(state)
    del partial["dec.blocks.5.weight"]
    torch.save(partial, tmp_path / "partial.pt")
    one_line_error(["convert", "vqvae2", str(tmp_path / "partial.pt"), "-o", out], "lacks", "dec.blocks.5.weight")
    # an extra tensor
    torch.save({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    one_line_error(["convert", "vqvae2", str(tmp_path / "extra.pt"), "-o", out], "extra.weight")
    # a wrong shape
    bad = dict(state)
    bad["upsample_t.weight"] = torch.zeros(16, 16, 3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    one_line_error(["convert", "vqvae2", str(tmp_path / "shape.pt"), "-o", out], "upsample_t.weight", "(16, 16, 3, 3)")
    # hyper-parameters that do not match the tensors
    one_line_error(["convert", "vqvae2", str(RV / "vqvae_001.pt"), "-o", out, "--set", "channel=64"],
                   "enc_b.blocks.0.weight")
    one_line_error(["convert", "vqvae2", str(RV / "vqvae_001.pt"), "-o", out, "--set", "n_res_block=2"],
                   "hyper-parameters", "missing")
    one_line_error(["convert", "vqvae2", str(RV / "vqvae_001.pt"), "-o", out, "--set", "chanel=64"], "chanel")
    # a hostile size: a real build would need terabytes; the meta-device build rejects it by shape first
    one_line_error(["convert", "vqvae2", str(RV / "vqvae_001.pt"), "-o", out, "--set", "n_embed=100000000000"],
                   "quantize_b.cluster_size", "(100000000000,)")
    # another project's file
    one_line_error(["convert", "vqvae2", str(FIXTURES / "ut" / "absorbing_ema_2000.th"), "-o", out],
                   "not a rosinality VQ-VAE-2 checkpoint")
    assert not Path(out).exists()


def test_convert_refuses_to_overwrite(tmp_path, vqvae2):
    _, converted = vqvae2
    target = tmp_path / "mine.safetensors"
    shutil.copy(converted, target)
    before = target.read_bytes()
    one_line_error(["convert", "vqvae2", str(RV / "vqvae_001.pt"), "-o", str(target)], "exists", "--overwrite")
    assert target.read_bytes() == before
    one_line_error(["convert", "taming", str(RV / "vqvae_001.pt"), "-o", str(tmp_path / "x.safetensors"),
                    "--preset", "ffhq"], "takes no --preset")


def test_errors_are_genfw_errors():
    from genfw_vq.convert_vqvae2 import convert_vqvae2

    with pytest.raises(GenfwError, match="not found"):
        convert_vqvae2(RV / "nope.pt", "x.safetensors")


# --------------------------------------------------------------------------------------------
# Unleashing Transformers (samb-t/unleashing-transformers): VQ-GAN and absorbing prior

UT = FIXTURES / "ut"


@pytest.fixture(scope="module")
def ut_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ut")
    for name, src, cfg in (("tok", "vqgan_ema_1000.th", "vqgan_hparams.json"),
                           ("prior", "absorbing_ema_2000.th", "absorbing_hparams.json")):
        code, text = cli("convert", "unleashing", str(UT / src), "-o", str(d / f"{name}.safetensors"),
                         "--config", str(UT / cfg))
        assert code == 0, text
    return genfw.load(d / "tok.safetensors"), genfw.load(d / "prior.safetensors"), d


def test_unleashing_vqgan_matches_reference(ut_models):
    tok, _, d = ut_models
    ref = load_file(UT / "vqgan_reference.safetensors")
    assert tok.params.unit_range and not tok.params.quant_convs
    with torch.no_grad():
        images = ref["images"] * 2 - 1  # theirs are in [0, 1], genfw's in [-1, 1]
        (codes,) = tok.encode(images)
        assert torch.equal(codes, ref["codes_grid"])
        recon = (tok(images)[0] + 1) / 2
        assert max_diff(recon, ref["recon"]) < ATOL
        grids = ref["decode_codes"].view(-1, 4, 4)
        decoded = (tok.decode_latents(tok.quantize.lookup(grids)) + 1) / 2
        assert max_diff(decoded, ref["decoded"]) < ATOL
    meta = json.loads(load_file_meta(d / "tok.safetensors"))["extra"]
    assert any(k.startswith("perceptual.net.") for k in meta["dropped"])
    assert any(k.startswith("ae.generator.logsigma.") for k in meta["dropped"])
    assert not any(k.startswith("disc.") for k in meta["dropped"])  # the discriminator is kept


def test_unleashing_prior_matches_reference(ut_models):
    _, prior, d = ut_models
    ref = load_file(UT / "absorbing_reference.safetensors")
    assert prior.mask_id == 32 and prior.params.timesteps == 256
    with torch.no_grad():
        logits = prior.backbone(ref["tokens"].view(-1, 4, 4))
    assert max_diff(logits.reshape(4, 16, 32), ref["logits"]) < ATOL
    meta = json.loads(load_file_meta(d / "prior.safetensors"))["extra"]
    assert sorted(meta["dropped"]) == ["Lt_count", "Lt_history", "_denoise_fn.start_tok", "loss_history"]
    assert meta["sampler"] == {"steps": 256, "temperature": 1.0}


def test_unleashing_bad_files(tmp_path):
    out = str(tmp_path / "o.safetensors")
    cfg = str(UT / "absorbing_hparams.json")
    state = torch.load(UT / "absorbing_ema_2000.th", map_location="cpu", weights_only=True)
    partial = {k: v for k, v in state.items() if k != "_denoise_fn.blocks.1.attn.key.weight"}
    torch.save(partial, tmp_path / "partial.th")
    one_line_error(["convert", "unleashing", str(tmp_path / "partial.th"), "-o", out, "--config", cfg],
                   "lacks", "_denoise_fn.blocks.1.attn.key.weight")
    bad = dict(state)
    bad["_denoise_fn.head.weight"] = torch.zeros(31, 64)
    torch.save(bad, tmp_path / "shape.th")
    one_line_error(["convert", "unleashing", str(tmp_path / "shape.th"), "-o", out, "--config", cfg],
                   "_denoise_fn.head.weight", "(31, 64)", "(32, 64)")
    # hyper-parameters that do not match the tensors
    one_line_error(["convert", "unleashing", str(UT / "absorbing_ema_2000.th"), "-o", out, "--config", cfg,
                    "--set", "bert_n_emb=128"], "_denoise_fn.", "64)", "128)", "hyper-parameters")
    one_line_error(["convert", "unleashing", str(UT / "absorbing_ema_2000.th"), "-o", out, "--config", cfg,
                    "--set", "bert_n_layers=1"], "no place", "_denoise_fn.blocks.1.")
    one_line_error(["convert", "unleashing", str(UT / "absorbing_ema_2000.th"), "-o", out],
                   "--config", "--preset")
    one_line_error(["convert", "unleashing", str(UT / "vqgan_ema_1000.th"), "-o", out,
                    "--config", str(UT / "vqgan_hparams.json"), "--set", "nf=64"], "ae.encoder.blocks.0.weight")
    # a taming-transformers file given to the unleashing converter
    taming = {"state_dict": {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
                             "quantize.embedding.weight": torch.zeros(32, 16)}}
    torch.save(taming["state_dict"], tmp_path / "taming.ckpt")
    one_line_error(["convert", "unleashing", str(tmp_path / "taming.ckpt"), "-o", out, "--config", cfg],
                   "not an Unleashing Transformers checkpoint", "genfw convert taming")
    torch.save(taming, tmp_path / "taming_full.ckpt")
    one_line_error(["convert", "unleashing", str(tmp_path / "taming_full.ckpt"), "-o", out, "--config", cfg],
                   "Lightning", "genfw convert taming")
    assert not Path(out).exists()


# --------------------------------------------------------------------------------------------
# megapixel-SUNDAE (vvvm23/sundae-vqgan)

SV = FIXTURES / "sv"


@pytest.fixture(scope="module")
def sundae(tmp_path_factory):
    out = tmp_path_factory.mktemp("sv") / "prior.safetensors"
    code, text = cli("convert", "sundae", str(SV / "checkpoint-0000002.pt"), "-o", str(out),
                     "--config", str(SV / "config.toml"))
    assert code == 0, text
    return genfw.load(out), out


def test_sundae_matches_reference(sundae):
    prior, out = sundae
    ref = load_file(SV / "reference.safetensors")
    bp = prior.backbone.params
    assert (bp.rotary_heads, bp.resampling_groups, bp.valley_rotary_max_freq) == ("first", "raster", 4.0)
    with torch.no_grad():
        logits = prior.backbone(ref["tokens"].view(-1, 8, 8))
    assert max_diff(logits.reshape(4, 64, 32), ref["logits"]) < ATOL
    meta = json.loads(load_file_meta(out))["extra"]
    assert {"opt", "lr_scheduler", "scaler"} <= set(meta["dropped"])
    assert sum(k.endswith("rotary_pos_emb.freqs") for k in meta["dropped"]) == 5
    assert meta["sampler"]["steps"] == 10 and meta["sampler"]["temperature"] == 0.8
    codes = prior.sample(2, generator=torch.Generator().manual_seed(0), steps=3, min_steps=0)
    assert codes.shape == (2, 8, 8) and 0 <= int(codes.min()) and int(codes.max()) < 32


def test_sundae_authors_behaviour_matters(sundae):
    """Each explicit param changes the logits: with genfw's defaults they would not match."""
    prior, _ = sundae
    ref = load_file(SV / "reference.safetensors")
    tokens = ref["tokens"].view(-1, 8, 8)
    for change in ({"rotary_heads": "all"}, {"resampling_groups": "patch"}, {"valley_rotary_max_freq": 16.0}):
        params = prior.backbone.params.model_copy(update=change)
        other = type(prior.backbone)(params, **prior.backbone.construct)
        other.load_state_dict(prior.backbone.state_dict())
        with torch.no_grad():
            assert max_diff(other.eval()(tokens).reshape(4, 64, 32), ref["logits"]) > 1e-3, change


def test_sundae_bad_files(tmp_path):
    out = str(tmp_path / "o.safetensors")
    cfg = str(SV / "config.toml")
    ckpt = torch.load(SV / "checkpoint-0000002.pt", map_location="cpu", weights_only=True)
    net = ckpt["net"]
    torch.save({"net": {k: v for k, v in net.items() if k != "transformer.norm_out.bias"}}, tmp_path / "partial.pt")
    one_line_error(["convert", "sundae", str(tmp_path / "partial.pt"), "-o", out, "--config", cfg],
                   "lacks", "transformer.norm_out.bias")
    torch.save({"net": {**net, "to_logits.weight": torch.zeros(33, 64)}}, tmp_path / "shape.pt")
    one_line_error(["convert", "sundae", str(tmp_path / "shape.pt"), "-o", out, "--config", cfg],
                   "to_logits.weight", "(33, 64)", "(32, 64)")
    one_line_error(["convert", "sundae", str(SV / "checkpoint-0000002.pt"), "-o", out, "--config", cfg,
                    "--set", "net.nb_heads=8"], "hyper-parameters", "to_q")
    one_line_error(["convert", "sundae", str(SV / "checkpoint-0000002.pt"), "-o", out, "--config", cfg,
                    "--set", "data.sequence_length=256", "--set", "vqgan.latent_shape=[16,16]"], "rotary", "freqs")
    one_line_error(["convert", "sundae", str(SV / "checkpoint-0000002.pt"), "-o", out], "--config")
    one_line_error(["convert", "sundae", str(UT / "absorbing_ema_2000.th"), "-o", out, "--config", cfg],
                   "genfw convert unleashing")
    assert not Path(out).exists()


# --------------------------------------------------------------------------------------------
# converted parts -> bundle -> genfw sample; converted parts in a recipe -> genfw eval


def test_assembled_bundle_samples(ut_models, tmp_path):
    _, _, d = ut_models
    bundle = tmp_path / "ut.safetensors"
    code, text = cli("assemble", "-o", str(bundle), "--tokenizer", str(d / "tok.safetensors"),
                     "--prior", str(d / "prior.safetensors"), "--sampler", "steps=8")
    assert code == 0, text
    loaded = genfw.load(bundle)
    assert loaded.extra["sampler"] == {"steps": 8, "temperature": 1.0}  # the authors' temp, our steps
    code, text = cli("sample", str(bundle), "-n", "2", "--out", str(tmp_path / "samples"), "--device", "cpu")
    assert code == 0, text
    from PIL import Image

    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert len(pngs) >= 2 and Image.open(pngs[0]).size == (16, 16)
    # parts that do not fit: a prior for another codebook, a tokenizer given as a prior
    one_line_error(["assemble", "-o", str(tmp_path / "x.safetensors"), "--tokenizer", str(d / "tok.safetensors"),
                    "--prior", str(d / "tok.safetensors")], "not a prior")
    one_line_error(["assemble", "-o", str(tmp_path / "x.safetensors"), "--tokenizer", str(d / "tok.safetensors"),
                    "--prior", str(d / "prior.safetensors"), "--sampler", "unroll=3"], "unroll")


def test_converted_models_run_and_eval(ut_models, tmp_path):
    import yaml

    _, prior, d = ut_models
    recipe = {
        "name": "ut-converted", "seed": 0, "class_conditional": False,
        "data": {"name": "synthetic", "params": {"size": 12, "resolution": 16, "channels": 3}},
        "tokenizer": {"name": "vqgan", "checkpoint": str(d / "tok.safetensors")},
        "prior": {"name": "absorbing", "checkpoint": str(d / "prior.safetensors"),
                  "backbone": prior.construct["backbone"]},
        "latents": {"flip": False, "holdout": 0.5},
        "sample": {"n": 2, "batch_size": 2, "params": {"steps": 4}},
        "evaluate": {"metrics": ["reconstruction", "nll"]},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    code, text = cli("run", str(path), "--output-dir", str(run), "--device", "cpu")
    assert code == 0, text
    (run / "metrics.json").unlink()
    code, text = cli("eval", str(run), "--device", "cpu")
    assert code == 0, text
    metrics = json.loads((run / "metrics.json").read_text())
    nll = metrics["prior0/nll_bits_per_token"]
    assert 0 < nll < 50  # an ELBO bound in bits per token of a 32-code random-weight prior
    assert metrics["tokenizer/mse"] > 0 and metrics["tokenizer/level0/perplexity"] > 1
    # the converted weights were used as they are, not retrained
    assert torch.equal(genfw.load(run / "prior0" / "model.safetensors").backbone.head.weight, prior.backbone.head.weight)


def test_assemble_rejects_parts_that_do_not_fit(ut_models, sundae, tmp_path):
    _, _, d = ut_models
    _, sundae_prior = sundae
    one_line_error(["assemble", "-o", str(tmp_path / "x.safetensors"), "--tokenizer", str(d / "tok.safetensors"),
                    "--prior", str(sundae_prior)], "8x8 grid", "4x4")
    one_line_error(["assemble", "-o", str(tmp_path / "x.safetensors"), "--tokenizer", str(d / "tok.safetensors"),
                    "--prior", str(d / "prior.safetensors"), "--prior", str(d / "prior.safetensors")],
                   "1 code level(s) but 2 prior(s)")
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------------------
# genfw.testing.check_converter on every built-in paper converter (taming: tests/test_tokenizers.py)


def test_check_converter_vqvae2():
    from genfw.testing import check_converter

    ref = load_file(RV / "reference.safetensors")
    check_converter("vqvae2", RV / "vqvae_001.pt", options={"config": str(RV / "vqvae_config.json"), "resolution": 32},
                    inputs=ref["images"], reference={"codes": [ref["id_t"], ref["id_b"]], "images": ref["decoded"]},
                    atol=ATOL)


def test_check_converter_unleashing_both_files():
    from genfw.testing import check_converter

    ref = load_file(UT / "vqgan_reference.safetensors")
    for name in ("unleashing-vqgan", "unleashing"):  # `unleashing` hands a VQ-GAN file to unleashing-vqgan
        check_converter(name, UT / "vqgan_ema_1000.th", options={"config": str(UT / "vqgan_hparams.json")},
                        inputs=ref["images"] * 2 - 1, run=lambda m, x: {"codes": m.encode(x), "recon": (m(x)[0] + 1) / 2},
                        reference={"codes": [ref["codes_grid"]], "recon": ref["recon"]}, atol=ATOL,
                        wrong_file=name == "unleashing")
    ref = load_file(UT / "absorbing_reference.safetensors")
    check_converter("unleashing", UT / "absorbing_ema_2000.th", options={"config": str(UT / "absorbing_hparams.json")},
                    inputs=ref["tokens"].view(-1, 4, 4), run=lambda m, t: m.backbone(t).reshape(4, 16, 32),
                    reference=ref["logits"], atol=ATOL, wrong_file=False)


def test_check_converter_sundae():
    from genfw.testing import check_converter

    ref = load_file(SV / "reference.safetensors")
    check_converter("sundae", SV / "checkpoint-0000002.pt", options={"config": str(SV / "config.toml")},
                    inputs=ref["tokens"].view(-1, 8, 8), run=lambda m, t: m.backbone(t).reshape(4, 64, 32),
                    reference=ref["logits"], atol=ATOL)


def test_convert_set_is_validated_and_named_as_the_source(tmp_path):
    out = str(tmp_path / "o.safetensors")
    src, cfg = str(UT / "absorbing_ema_2000.th"), str(UT / "absorbing_hparams.json")
    one_line_error(["convert", "unleashing", src, "-o", out, "--config", cfg, "--set", "bert_n_embd=64"],
                   "converter 'unleashing': --set bert_n_embd: unknown key (allowed keys:", "bert_n_emb,")
    one_line_error(["convert", "unleashing", src, "-o", out, "--config", cfg, "--set", "bert_n_emb=wide"],
                   "--set bert_n_emb='wide'", "integer")
    one_line_error(["convert", "unleashing", src, "-o", out, "--config", cfg, "--set", "bert_n_emb=128"],
                   "hyper-parameters given (your --set bert_n_emb=128)")
    one_line_error(["convert", "sundae", str(SV / "checkpoint-0000002.pt"), "-o", out, "--config",
                    str(SV / "config.toml"), "--set", "net.dims=3"], "--set net.dims: unknown key", "net.dim,")
    assert not Path(out).exists()
