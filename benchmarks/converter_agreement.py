"""Numerical agreement of the converters with the authors' code, on the shared fixtures.

Converts each fixture of ``../shared/converters/`` (tiny random-weight checkpoints written by the
authors' code, with that code's outputs on fixed inputs) and prints, for each output, whether codes
are identical and the max abs difference of logits / images from the authors' float32 outputs
(and from their float64 twins). float32 on CPU, one run (the computation is deterministic).
A measurement, not a test (tests/test_convert.py asserts the 1e-4 bound). Usage::

    .venv/bin/python benchmarks/converter_agreement.py [--fixtures ../shared/converters]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from genfw.registry import get_registry


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{float((a.double() - b.double()).abs().max()):.2e}"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(Path(__file__).parents[1] / ".." / "shared" / "converters"))
    root = Path(ap.parse_args().fixtures)
    convert = get_registry().load
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows: list[tuple[str, str, str, str]] = []

        rv = root / "rv"
        m = convert("converter", "vqvae2")(rv / "vqvae_001.pt", out / "rv.safetensors",
                                           config=str(rv / "vqvae_config.json"), overrides={"resolution": 32})
        ref = load_file(rv / "reference.safetensors")
        top, bottom = m.encode(ref["images"])
        rows.append(("vqvae2", "codes (top, bottom)", str(torch.equal(top, ref["id_t"]) and torch.equal(bottom, ref["id_b"])), ""))
        dec = m.decode([ref["id_t"], ref["id_b"]])
        rows.append(("vqvae2", "decoded images", diff(dec, ref["decoded"]), diff(dec, ref["decoded_f64"])))
        rnd = m.decode([ref["random_id_t"], ref["random_id_b"]])
        rows.append(("vqvae2", "decoded random codes", diff(rnd, ref["random_decoded"]), diff(rnd, ref["random_decoded_f64"])))
        fwd = m(ref["images"])[0]
        rows.append(("vqvae2", "forward (reconstruction)", diff(fwd, ref["forward_out"]), diff(fwd, ref["forward_out_f64"])))

        ut = root / "ut"
        tok = convert("converter", "unleashing")(ut / "vqgan_ema_1000.th", out / "tok.safetensors",
                                                 config=str(ut / "vqgan_hparams.json"))
        ref = load_file(ut / "vqgan_reference.safetensors")
        images = ref["images"] * 2 - 1
        rows.append(("unleashing VQ-GAN", "codes", str(torch.equal(tok.encode(images)[0], ref["codes_grid"])), ""))
        recon = (tok(images)[0] + 1) / 2
        rows.append(("unleashing VQ-GAN", "reconstruction", diff(recon, ref["recon"]), diff(recon, ref["recon_f64"])))
        dec = (tok.decode_latents(tok.quantize.lookup(ref["decode_codes"].view(-1, 4, 4))) + 1) / 2
        rows.append(("unleashing VQ-GAN", "decoded codes", diff(dec, ref["decoded"]), diff(dec, ref["decoded_f64"])))
        prior = convert("converter", "unleashing")(ut / "absorbing_ema_2000.th", out / "prior.safetensors",
                                                   config=str(ut / "absorbing_hparams.json"))
        ref = load_file(ut / "absorbing_reference.safetensors")
        logits = prior.backbone(ref["tokens"].view(-1, 4, 4)).reshape(ref["logits"].shape)
        rows.append(("unleashing absorbing", "logits", diff(logits, ref["logits"]), diff(logits, ref["logits_f64"])))

        sv = root / "sv"
        prior = convert("converter", "sundae")(sv / "checkpoint-0000002.pt", out / "sv.safetensors",
                                               config=str(sv / "config.toml"))
        ref = load_file(sv / "reference.safetensors")
        logits = prior.backbone(ref["tokens"].view(-1, 8, 8)).reshape(ref["logits"].shape)
        rows.append(("sundae", "logits", diff(logits, ref["logits"]), diff(logits, ref["logits_f64"])))

    print(f"{'converter':22} {'output':26} {'vs float32 (codes: equal)':>26} {'vs float64':>12}")
    for r in rows:
        print(f"{r[0]:22} {r[1]:26} {r[2]:>26} {r[3]:>12}")


if __name__ == "__main__":
    main()
