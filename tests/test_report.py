"""The report: every logged scalar drawn (grouped), labelled samples, metrics apart from settings."""

import numpy as np
import torch
from PIL import Image

from genfw.images import make_grid, to_pil
from genfw.report import curve_groups, plot_curves, plot_labelled_samples, split_metrics


def test_every_logged_scalar_is_a_curve_grouped_by_prefix(tmp_path):
    records = [{"step": s, "loss/prior": 1.0 / s, "bits_per_token": 2.0, "lr": 1e-3, "loss/disc": 0.5,
                "steps_per_s": 3.0, "note": "text"} for s in range(1, 5)]
    groups = curve_groups(records)
    assert set(groups) == {"loss", "bits_per_token", "lr", "steps_per_s"}
    assert set(groups["loss"]) == {"prior", "disc"} and len(groups["lr"]["lr"]) == 4
    assert plot_curves({"prior0": records}, str(tmp_path / "c.png"))
    assert Image.open(tmp_path / "c.png").size[0] >= 4 * 400  # four panels side by side


def test_metrics_are_separated_from_settings():
    values, settings = split_metrics({"fidelity/fid": 3.2, "fidelity/num_samples": 100, "fidelity/batch_size": 64,
                                      "fidelity/feature_extractor": "genfw-classifier", "prior0/nll_kind": "exact",
                                      "prior0/nll_bits_per_token": 1.5, "sample/device": "cpu", "class_accuracy": 0.9})
    assert set(values) == {"fidelity/fid", "prior0/nll_bits_per_token", "class_accuracy"}
    assert {"fidelity/num_samples", "fidelity/batch_size", "sample/device", "prior0/nll_kind"} <= set(settings)


def test_labelled_sample_grid(tmp_path):
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    assert plot_labelled_samples(images, torch.tensor([0, 1, 2, 0, 1, 2]), ["zero", "one", "two"],
                                 str(tmp_path / "s.png"))
    assert Image.open(tmp_path / "s.png").size[0] > 100


def test_kid_has_no_spread_when_the_subset_is_the_whole_set():
    from genfw import metrics

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.arange(40) % 2
    classifier = metrics.train_classifier(x, y, 2, steps=5)
    whole = metrics.fidelity(x[:20], x[20:], classifier)
    assert "kid_std" not in whole and whole["kid_subsets"] == 1
    part = metrics.fidelity(x[:20], x[20:], classifier, kid_subset_size=10, kid_subsets=5)
    assert "kid_std" in part and part["kid_subsets"] == 5


def _old_make_grid(images, columns=None, pad=2):
    """The hand-written grid torchvision's replaced (kept here to pin the behaviour)."""
    b, c, h, w = images.shape
    columns = columns or max(1, int(np.ceil(np.sqrt(b))))
    rows = int(np.ceil(b / columns))
    canvas = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y : y + h, x : x + w] = images[i].float().clamp(-1, 1)
    arr = ((canvas + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)


def test_torchvision_grid_keeps_the_old_behaviour():
    g = torch.Generator().manual_seed(1)
    for shape, columns in (((5, 1, 4, 6), None), ((1, 3, 4, 4), None), ((3, 3, 5, 5), 5), ((7, 1, 3, 3), 2)):
        images = torch.rand(*shape, generator=g) * 2.4 - 1.2  # outside [-1, 1] too: clamped
        new, old = make_grid(images, columns), _old_make_grid(images, columns)
        assert new.mode == old.mode and new.size == old.size
        assert np.array_equal(np.asarray(new), np.asarray(old)), shape
    assert to_pil(torch.zeros(1, 2, 2)).getpixel((0, 0)) == 128  # 127.5 rounds, not truncates
