"""genfw.metrics: density/coverage, fidelity through torch-fidelity, the classifier extractor,
Inception weights without downloads, reconstruction, likelihood and timing."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from helpers import edit_meta
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from genfw import metrics
from genfw.errors import CheckpointError, ConfigError
from genfw.interfaces import NLLOutput, Prior, StepOutput

# --------------------------------------------------------------------------------------------
# fixtures


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@pytest.fixture(scope="module")
def shapes():
    """Synthetic discs/squares/crosses: a training split and an independent evaluation split."""
    from genfw.registry import get_registry

    build = get_registry().build
    train = _stack(build("dataset", "synthetic", {"size": 384, "resolution": 16, "seed": 0}))
    held_out = _stack(build("dataset", "synthetic", {"size": 240, "resolution": 16, "seed": 1}))
    other = _stack(build("dataset", "synthetic", {"size": 240, "resolution": 16, "seed": 2}))
    return train, held_out, other


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Everything here is tiny: a second thread gains nothing, and on a busy CPU each parallel
    # op can wait a whole scheduler slice for it (we measured 100x slower steps, and numpy's
    # BLAS, which torch-fidelity's FID and KID use, behaves the same).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dev dependency (via mlxtend's scikit-learn); only speed depends on it
        limiter = None
    else:
        limiter = threadpool_limits(limits=1)
    yield
    if limiter is not None:
        limiter.restore_original_limits()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier(shapes):
    (x, y), _, _ = shapes
    # the fidelity mechanics on the small network of older genfw files (fast); the two evaluation
    # networks are tested by test_evaluation_networks_learn_shapes
    return metrics.train_classifier(x, y, num_classes=3, steps=250, seed=0, batch_size=32, arch="strided",
                                    dropout=0.0, lr=5e-3, max_degrees=0, max_scale=0)


@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    """An empty torch hub dir, and any attempt to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*args, **kwargs):
        raise AssertionError("genfw tried to download weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path


# --------------------------------------------------------------------------------------------
# density and coverage


def test_density_coverage_hand_computed():
    # Real points 0, 10, 20 with k=1: every radius is 10. The fake point 5 lies strictly inside
    # the balls of 0 and 10 (distance 5 < 10) but not of 20 (15): density 2/(1*1), coverage 2/3.
    real = torch.tensor([[0.0], [10.0], [20.0]])
    got = metrics.density_coverage(real, torch.tensor([[5.0]]), k=1)
    assert got["density"] == pytest.approx(2.0)
    assert got["coverage"] == pytest.approx(2 / 3)
    # On a ball's boundary is outside (strict <, as Naeem et al.'s code): 10 away from 0 and 20.
    got = metrics.density_coverage(real, torch.tensor([[30.0]]), k=1)
    assert got == {"density": 0.0, "coverage": 0.0}


def test_density_coverage_identical_disjoint_and_same_distribution():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=g)
    same = metrics.density_coverage(real, real.clone(), k=5)
    assert same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0)  # each real ball holds itself + k-1 others
    far = metrics.density_coverage(real, real + 100.0, k=5)
    assert far == {"density": 0.0, "coverage": 0.0}
    fresh = metrics.density_coverage(real, torch.randn(600, 8, generator=g), k=5)
    assert 0.8 < fresh["density"] < 1.2
    # Naeem et al.: E[coverage] = 1 - (1/2)^k for M = N samples of the same distribution.
    assert fresh["coverage"] == pytest.approx(1 - 0.5**5, abs=0.04)


# --------------------------------------------------------------------------------------------
# classifier feature extractor and fidelity


def test_classifier_learns_shapes(shapes, classifier):
    _, (x, y), _ = shapes
    assert metrics.classifier_accuracy(classifier, x, y) > 0.9
    assert metrics.classifier_accuracy(classifier, x, (y + 1) % 3) < 0.1
    features, logits = classifier(x[:4])
    assert features.shape == (4, 128) and logits.shape == (4, 3)


def test_classifier_training_is_deterministic(shapes):
    (x, y), _, _ = shapes
    a = metrics.train_classifier(x, y, 3, steps=3, seed=7)
    b = metrics.train_classifier(x, y, 3, steps=3, seed=7)
    c = metrics.train_classifier(x, y, 3, steps=3, seed=8)
    assert metrics.fingerprint(a) == metrics.fingerprint(b) != metrics.fingerprint(c)
    state = torch.get_rng_state()
    metrics.train_classifier(x, y, 3, steps=2, seed=7, arch="lenet")  # dropout draws from its own seed
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", ["convnet", "lenet"])
def test_evaluation_networks_learn_shapes(shapes, arch):
    (x, y), (hx, hy), _ = shapes
    model = metrics.train_classifier(x, y, 3, steps=40, seed=0, arch=arch, batch_size=32)
    assert model.params.arch == arch
    report = metrics.classifier_report(model, hx, hy)
    # 40 steps are far from trained (MNIST's >= 0.99 is a slow test): well above chance (1/3) is
    # the bar (measured: convnet 0.89, lenet 0.54)
    assert report["accuracy"] > 0.45 and 0 <= report["ece"] < 0.3 and report["num_images"] == 240
    # eval mode: an image's features do not depend on the batch it is in (batch norm's running statistics)
    alone = model(hx[:1])[0]
    torch.testing.assert_close(model(hx[:50])[0][:1], alone, rtol=1e-4, atol=1e-5)


def test_classifier_files_without_an_arch_load_as_the_older_network(classifier, tmp_path):
    path = tmp_path / "old.safetensors"
    metrics.save_classifier(classifier, path)
    edit_meta(path, lambda meta: meta["classifier"].pop("arch"))
    assert metrics.load_classifier(path).params.arch == "strided"


def test_fidelity_of_a_set_with_itself_and_of_shifted_sets(shapes, classifier):
    _, (real, _), (other, other_labels) = shapes
    self_scores = metrics.fidelity(real, real, classifier, batch_size=50)
    assert abs(self_scores["fid"]) < 1e-3
    for key in ("precision", "recall", "coverage"):
        assert self_scores[key] == pytest.approx(1.0), key
    assert self_scores["density"] == pytest.approx(1.0, abs=0.02)  # below 1 only by duplicate images
    assert self_scores["num_samples"] == self_scores["num_reference"] == 240
    assert self_scores["feature_extractor"] == "genfw-classifier"
    assert "inception_score" not in self_scores

    same = metrics.fidelity(other, real, classifier)
    discs_only = metrics.fidelity(other[other_labels == 0], real, classifier)  # mode collapse
    noisy = metrics.fidelity((other + 0.6 * torch.randn_like(other)).clamp(-1, 1), real, classifier)
    inverted = metrics.fidelity(-other, real, classifier)  # off the data manifold
    assert 0 < same["fid"] < discs_only["fid"]
    assert abs(self_scores["kid"]) < same["kid"] < discs_only["kid"]
    assert same["fid"] < noisy["fid"]
    assert discs_only["coverage"] < same["coverage"] - 0.3
    assert discs_only["recall"] < same["recall"] - 0.3
    assert inverted["precision"] < same["precision"] - 0.3
    assert inverted["density"] < same["density"] - 0.3
    assert discs_only["num_samples"] == 80 and discs_only["kid_subset_size"] == 80


def test_fidelity_does_not_depend_on_batch_size(shapes, classifier):
    _, (real, _), (other, _) = shapes
    a = metrics.fidelity(other, real, classifier, batch_size=16)
    b = metrics.fidelity(other, real, classifier, batch_size=240)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4)
    assert a["density"] == pytest.approx(b["density"], abs=1e-6)


def test_classifier_roundtrip_and_torch_fidelity_registration(shapes, classifier, tmp_path):
    _, (real, _), (other, _) = shapes
    path = tmp_path / "classifier.safetensors"
    metrics.save_classifier(classifier, path, extra={"class_names": ["disc", "square", "cross"]})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    loaded = metrics.load_classifier(path)
    assert metrics.fingerprint(loaded) == metrics.fingerprint(classifier)
    torch.testing.assert_close(loaded(real[:8])[1], classifier(real[:8])[1])

    # torch-fidelity itself builds the registered extractor from the file.
    ours = metrics.fidelity(other, real, loaded)
    theirs = torch_fidelity.calculate_metrics(
        input1=metrics._UInt8Images(other), input2=metrics._UInt8Images(real), fid=True,
        feature_extractor="genfw-classifier", feature_extractor_weights_path=str(path),
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    assert theirs[torch_fidelity.KEY_METRIC_FID] == pytest.approx(ours["fid"], rel=1e-5)


def test_load_classifier_rejects_other_files(tmp_path):
    from genfw import checkpoint

    path = tmp_path / "latents.safetensors"
    checkpoint.save_tensors(path, {"labels": torch.zeros(3)}, {"type": "latents"})
    with pytest.raises(CheckpointError, match="not a classifier"):
        metrics.load_classifier(path)


def test_fidelity_needs_more_samples_than_neighbours(classifier):
    x = torch.zeros(5, 1, 16, 16)
    with pytest.raises(ConfigError, match="more than 5"):
        metrics.fidelity(x, x, classifier, prdc_k=5)


# --------------------------------------------------------------------------------------------
# Inception: local weights only


def test_inception_without_weights_raises_and_does_not_download(no_downloads):
    x = torch.zeros(8, 1, 16, 16)
    with pytest.raises(ConfigError) as err:
        metrics.fidelity(x, x, "inception-v3-compat", prdc_k=3)
    message = str(err.value)
    assert metrics.INCEPTION_WEIGHTS_URL in message
    assert str(no_downloads / "torch" / "hub" / "checkpoints" / metrics.INCEPTION_WEIGHTS_FILE) in message
    assert "feature_extractor: classifier" in message and "\n" not in message
    with pytest.raises(ConfigError):
        metrics.choose_extractor("inception-v3-compat", has_labels=True, resolution=256)
    with pytest.raises(ConfigError, match="not found"):
        metrics.choose_extractor("auto", has_labels=True, resolution=256,
                                 inception_weights_path=no_downloads / "missing.pth")


def test_choose_extractor(no_downloads):
    choose = metrics.choose_extractor
    assert choose("auto", has_labels=True, resolution=32) == "classifier"
    assert choose("auto", has_labels=True, resolution=256) == "classifier"  # no weights found
    with pytest.raises(ConfigError, match="Inception weights not found"):
        choose("auto", has_labels=False, resolution=256)
    with pytest.raises(ConfigError, match="needs a dataset with labels"):
        choose("classifier", has_labels=False, resolution=32)
    with pytest.raises(ConfigError, match="unknown"):
        choose("vgg", has_labels=True, resolution=32)

    cached = metrics.inception_cache_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert metrics.find_inception_weights() == cached
    assert choose("auto", has_labels=True, resolution=256) == "inception-v3-compat"
    assert choose("auto", has_labels=True, resolution=(28, 28)) == "classifier"
    assert choose("auto", has_labels=False, resolution=32) == "inception-v3-compat"


class _FakeInception(FeatureExtractorBase):
    """Stands in for the 24M-parameter Inception (far too slow for unit tests on CPU)."""

    seen: dict = {}

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        _FakeInception.seen = {"kwargs": kwargs}

    @staticmethod
    def get_provided_features_list():
        return "2048", "logits_unbiased"

    def forward(self, x):
        _FakeInception.seen["input"] = (x.dtype, tuple(x.shape[1:]))
        flat = x.float().flatten(1) / 255
        out = {"2048": flat[:, :8], "logits_unbiased": flat[:, :10]}
        return tuple(out[name] for name in self.features_list)


def test_inception_path_uses_cached_weights(no_downloads, monkeypatch):
    weights = metrics.inception_cache_path()
    weights.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)

    def fake_create(name, features, cuda=False, **kwargs):
        assert name == "inception-v3-compat" and not cuda
        return _FakeInception(name, features, **kwargs)

    monkeypatch.setattr("genfw.metrics.features.create_feature_extractor", fake_create)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    got = metrics.fidelity(x, x.flip(0), "inception-v3-compat", prdc_k=3)
    assert _FakeInception.seen["kwargs"]["feature_extractor_weights_path"] == str(weights)
    assert _FakeInception.seen["input"] == (torch.uint8, (3, 8, 8))  # greyscale expanded to RGB
    assert "inception_score" in got and got["fid"] == pytest.approx(0.0, abs=1e-6)
    assert got["feature_extractor_id"] == metrics.INCEPTION_WEIGHTS_FILE


def test_inception_weights_that_need_pickle_are_refused(no_downloads, monkeypatch):
    path = no_downloads / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1), "evil": time.struct_time((0,) * 9)}, path)
    monkeypatch.setattr("genfw.metrics.features.create_feature_extractor", lambda *a, **k: pytest.fail("must not load"))
    x = torch.zeros(8, 1, 8, 8)
    with pytest.raises(ConfigError, match="not a plain PyTorch state dict"):
        metrics.fidelity(x, x, "inception-v3-compat", prdc_k=3, inception_weights_path=path)


# --------------------------------------------------------------------------------------------
# reconstruction, likelihood, timing


def test_psnr():
    x = torch.zeros(2, 3, 4, 4)
    y = x + 0.1  # MSE 0.01 on a peak-to-peak range of 2 = MSE 0.0025 on [0, 1]
    expected = 10 * math.log10(1 / 0.0025)
    torch.testing.assert_close(metrics.psnr(x, y), torch.full((2,), expected))
    assert metrics.psnr(x, x).tolist() == [100.0, 100.0]
    u8 = lambda t: ((t + 1) * 127.5).double()  # noqa: E731 - the same images on [0, 255]
    rgb_psnr = 10 * torch.log10(255.0**2 / (u8(x) - u8(y)).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(metrics.psnr(x, y).double(), rgb_psnr)


def test_reconstruction_of_the_pixels_tokenizer(registry, shapes):
    _, (x, y), _ = shapes
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 240, 64)]
    pixels = registry.build("tokenizer", "pixels", {"levels": 256}, channels=1, resolution=tuple(x.shape[-2:]))
    exact = metrics.reconstruction(pixels, batches)
    assert exact["mse"] == pytest.approx(0.0, abs=1e-10) and exact["psnr"] == 100.0
    assert exact["num_images"] == 240
    # Two levels keep only black and white: the synthetic images are exactly that, two codes used.
    binary = metrics.reconstruction(registry.build("tokenizer", "pixels", {"levels": 2}, channels=1, resolution=tuple(x.shape[-2:])), batches)
    assert binary["level0/usage"] == 1.0 and 1 < binary["level0/perplexity"] <= 2
    # Four levels on grey images: a known quantisation error.
    grey = torch.full((4, 1, 8, 8), 0.1)
    four = metrics.reconstruction(registry.build("tokenizer", "pixels", {"levels": 4}, channels=1, resolution=(8, 8)), [grey])
    nearest = -1 + 2 / 3 * round((0.1 + 1) * 1.5)  # levels at -1, -1/3, 1/3, 1
    assert four["mse"] == pytest.approx((nearest - 0.1) ** 2, rel=1e-5)
    assert four["level0/usage"] == 0.25


class _UniformPrior(Prior):
    """Every code equally likely: NLL is exactly log2(K) bits per token."""

    nll_kind = "exact"

    def loss(self, codes, labels=None, context=None):
        return StepOutput({"main": torch.zeros(())})

    def sample(self, n, labels=None, context=None, init=None, mask=None, generator=None, params=None,
               grid=None, **overrides):
        return torch.randint(0, self.codebook_size, (n, *self.grid), generator=generator)

    def nll(self, codes, labels=None, context=None, generator=None):
        bits = torch.full((codes.shape[0],), math.log2(self.codebook_size))
        # Labels shift one sample's value, so that the test sees whether they are passed on.
        if labels is not None:
            bits = bits + labels.float()
        return NLLOutput(bits, "exact")


def test_prior_nll_averages_over_samples():
    prior = _UniformPrior(None, codebook_size=16, grid=[2, 2])
    batches = [{"codes": torch.zeros(3, 2, 2, dtype=torch.long)},
               {"codes": torch.zeros(1, 2, 2, dtype=torch.long), "labels": torch.tensor([4])}]
    got = metrics.prior_nll(prior, batches)
    assert got["nll_bits_per_token"] == pytest.approx((4 * 4 + 4) / 4)  # per sample, not per batch
    assert got["nll_kind"] == "exact" and got["num_samples"] == 4
    assert got["nll_bits_per_token_sem"] == pytest.approx(torch.tensor([4.0, 4, 4, 8]).std().item() / 2)


def test_timed():
    result, seconds = metrics.timed(lambda n: time.sleep(0.02) or n * 2, 21)
    assert result == 42 and 0.02 <= seconds < 1.0
