"""The three priors (sundae, absorbing, autoregressive): conformance, and behaviour on a toy
code distribution they must learn — 4x4 grids of 8 codes whose rows are constant and alternate
between two random codes — trained on CPU for a few seconds each (shared per module)."""

from __future__ import annotations

import math

import pytest
import torch

from genfw.errors import ConfigError
from genfw.interfaces import Level, Tokenizer
from genfw.nn.sampling import Windows, categorical, filter_logits
from genfw.registry import build
from genfw.sampling import generate
from genfw.testing import check_prior

K, GRID = 8, (4, 4)
TRANSFORMER = {"name": "transformer", "params": {"dim": 32, "depth": 2, "heads": 2}}
HOURGLASS = {"name": "hourglass", "params": {"dim": 32, "depth": [1, 1, 1], "heads": 2, "head_dim": 16}}
TOY_BACKBONE = {"name": "transformer", "params": {"dim": 64, "depth": 2, "heads": 4}}
# Tiny grids: update every position each step (the paper's MNIST setting, p = 1.0), so a step
# that leaves a sample unchanged means the model is sure of every code before it is frozen.
SUNDAE_TOY_SAMPLER = {"steps": 40, "temperature": 1.0, "temperature_end": 0.3,
                      "sample_proportion": 1.0, "sample_proportion_end": 1.0, "min_steps": 10}
# Absorbing: one position a step on the 16 tokens (a fixed count), so no two codes are drawn
# independently in one step; the paper's 1/t process needs about T = 256 steps for that.
TOY_SAMPLERS = {"sundae": SUNDAE_TOY_SAMPLER, "absorbing": {"steps": 16, "unmasking": "fixed"}, "autoregressive": {}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine run several times faster on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_codes(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, 4, 4]: every row constant, even rows code a, odd rows code b (a, b uniform)."""
    a, b = torch.randint(0, K, (2, n, 1), generator=generator)
    rows = torch.where(torch.arange(GRID[0]) % 2 == 0, a, b)  # n h
    return rows[:, :, None].expand(n, *GRID).clone()


def obeys(codes: torch.Tensor) -> torch.Tensor:
    """Per sample: rows constant and row i equal to row i - 2."""
    rows_constant = (codes == codes[:, :, :1]).flatten(1).all(1)
    alternating = (codes[:, 2:] == codes[:, :-2]).flatten(1).all(1)
    return rows_constant & alternating


def make(name: str, params: dict | None = None, backbone: dict = TRANSFORMER, *, grid=GRID,
         num_classes: int = 0, context: list | None = None):
    return build("prior", name, params or {}, codebook_size=K, grid=list(grid), num_classes=num_classes,
                 context=context or [], backbone=backbone)


def train(prior, data, steps: int, batch_size: int = 32, lr: float = 6e-3):
    """Adam on fresh batches from ``data(n, generator) -> (codes, context)``."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    # Linear decay to zero: the last steps settle the model, so short runs end reliably good.
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    prior.train()
    for _ in range(steps):
        codes, context = data(batch_size, g)
        loss = prior.loss(codes, None, context).losses["main"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return prior.eval()


def draw(prior, n: int, seed: int = 0, **kw) -> torch.Tensor:
    with torch.inference_mode():
        return prior.sample(n, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.fixture(scope="module")
def trained():
    """One prior of each kind trained on the toy distribution (a few seconds each)."""
    torch.manual_seed(0)
    setups = {"sundae": ({"unroll_steps": 2}, 200), "absorbing": ({"nll_timesteps": 16}, 300),
              "autoregressive": ({}, 300)}
    return {name: train(make(name, params, TOY_BACKBONE), lambda n, g: (toy_codes(n, g), None), steps)
            for name, (params, steps) in setups.items()}


# --------------------------------------------------------------------------------------------
# conformance (genfw.testing) on both backbones


@pytest.mark.parametrize(("name", "params", "sampler", "backbone"), [
    ("sundae", {"unroll_steps": 2}, {"steps": 12, "min_steps": 4}, TRANSFORMER),
    ("sundae", {"unroll_steps": 3, "label_drop": 0.2}, {"steps": 6, "guidance_scale": 2.0}, HOURGLASS),
    ("absorbing", {"nll_timesteps": 8}, {"steps": 8}, TRANSFORMER),
    ("absorbing", {"masking": "fixed", "loss_type": "elbo", "nll_timesteps": 4}, {"steps": 16}, HOURGLASS),
    ("absorbing", {"loss_type": "mlm", "timesteps": 16}, {"steps": 16, "temperature": 0.9}, TRANSFORMER),
    ("autoregressive", {}, {"top_k": 3}, TRANSFORMER),
    ("autoregressive", {}, {"use_cache": False, "top_p": 0.9, "temperature": 0.8}, TRANSFORMER),
])
def test_conformance(name, params, sampler, backbone):
    check_prior(name, params, backbone=backbone, sampler=sampler)
    check_prior(name, params, backbone=backbone, sampler=sampler, context=[[5, 2, 2]])


def test_autoregressive_refuses_a_bidirectional_backbone():
    with pytest.raises(ConfigError, match="causal"):
        make("autoregressive", backbone=HOURGLASS)


def test_sampler_params_validated():
    prior = make("absorbing", {"timesteps": 16})
    with pytest.raises(ValueError, match="cannot exceed"):
        draw(prior, 1, steps=32)
    with pytest.raises(ValueError, match="at least the training grid"):
        draw(make("sundae"), 1, grid=(2, 4), steps=2)


# --------------------------------------------------------------------------------------------
# learning the toy structure


@pytest.mark.parametrize("name", ["sundae", "absorbing", "autoregressive"])
def test_learns_toy_structure(trained, name):
    prior = trained[name]
    samples = draw(prior, 200, **TOY_SAMPLERS[name])
    rate = obeys(samples).float().mean().item()
    assert rate >= 0.9, f"{name}: only {rate:.0%} of samples obey the structure"
    assert len(set(map(tuple, samples[:, :2, 0].tolist()))) > 20, "samples are not diverse"
    # A trained model finds the toy data far likelier than uniform noise.
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        good = prior.nll(toy_codes(64, g), generator=g).bits_per_token.mean()
        noise = prior.nll(torch.randint(0, K, (64, *GRID), generator=g), generator=g).bits_per_token.mean()
    assert 2 * good < noise, (name, float(good), float(noise))


@pytest.mark.parametrize("name", ["sundae", "absorbing", "autoregressive"])
def test_inpainting_keeps_known_codes_and_completes_them(trained, name):
    prior = trained[name]
    g = torch.Generator().manual_seed(5)
    init = toy_codes(100, g)
    sampler = dict(TOY_SAMPLERS[name])
    if name == "sundae":
        sampler.update(temperature=0.5, temperature_end=0.3)  # paper 3.6: lower temperature
    # Bottom half regenerated: the top two rows determine it, in any order.
    half = torch.zeros_like(init, dtype=torch.bool)
    half[:, 2:] = True
    out = draw(prior, 100, init=init, mask=half, **sampler)
    assert torch.equal(out[~half], init[~half])
    assert (out == init).flatten(1).all(1).float().mean() >= 0.9
    # A scattered mask: unmasked codes never change.
    scattered = torch.rand(init.shape, generator=g) < 0.5
    out = draw(prior, 100, seed=1, init=init, mask=scattered, **TOY_SAMPLERS[name])
    assert torch.equal(out[~scattered], init[~scattered])
    # Bidirectional priors use known codes after a gap too (causal order cannot). SUNDAE's
    # denoiser cannot tell a lone known code from noise, so it sometimes settles against it.
    if name != "autoregressive":
        assert obeys(out).float().mean() >= {"absorbing": 0.9, "sundae": 0.75}[name]


# --------------------------------------------------------------------------------------------
# sundae


def test_sundae_default_sampler_is_the_authors_released_one():
    """config/ffhq256/ffhq256-hourglass-2102-4.toml (and -3103-4): 100 steps, temperature 0.8 ->
    0.8, proportion 0.5 -> 0.5; the authors' sampler starts self-stopping checks at step 10."""
    from genfw_sundae.sundae import sampler_ends

    sp = make("sundae").sampler_params()
    assert (sp.steps, sp.temperature, sp.sample_proportion, sp.min_steps) == (100, 0.8, 0.5, 10)
    assert sampler_ends(sp) == (0.8, 0.5) and sp.self_stopping


def test_sundae_self_stopping_saves_work_and_freezes(trained):
    prior = trained["sundae"]
    # Constant schedules, so a shorter run is an exact prefix of a longer one (same draws).
    sampler = dict(SUNDAE_TOY_SAMPLER, steps=30, temperature=0.6, temperature_end=0.6, min_steps=3)
    n = 16
    full = draw(prior, n, **sampler)
    stats = prior.last_sample_stats
    frozen_at = torch.tensor(stats["frozen_at"])
    assert stats["sample_steps"] == stats["backbone_evaluations"] < sampler["steps"] * n
    assert (frozen_at >= 0).any()
    for step in frozen_at[frozen_at >= 0].unique().tolist():
        prefix = draw(prior, n, **dict(sampler, steps=step + 1))
        same = frozen_at == step
        # What a sample was when it froze is what the long run returns: it never changed again.
        assert torch.equal(prefix[same], full[same])
    # Without self-stopping every sample runs every step.
    draw(prior, n, **dict(sampler, self_stopping=False))
    assert prior.last_sample_stats["sample_steps"] == sampler["steps"] * n


def test_sundae_classifier_free_guidance():
    torch.manual_seed(0)
    prior = make("sundae", {"label_drop": 0.3}, num_classes=3).eval()
    labels = torch.tensor([0, 1, 2, 1])
    sampler = {"steps": 6, "self_stopping": False}
    plain = draw(prior, 4, labels=labels, **sampler)
    assert torch.equal(draw(prior, 4, labels=labels, guidance_scale=1.0, **sampler), plain)
    guided = draw(prior, 4, labels=labels, guidance_scale=3.0, **sampler)
    assert not torch.equal(guided, plain)
    assert prior.last_sample_stats["backbone_evaluations"] == 2 * 4 * 6  # cond + uncond, one batch
    # s = 0 is the unconditional model: the null class.
    assert torch.equal(draw(prior, 4, labels=labels, guidance_scale=0.0, **sampler), draw(prior, 4, **sampler))
    with pytest.raises(ValueError, match="label_drop"):
        draw(make("sundae", num_classes=3), 4, labels=labels, guidance_scale=2.0, **sampler)


# --------------------------------------------------------------------------------------------
# absorbing


def test_absorbing_step_skipping_reveals_everything(trained):
    prior = trained["absorbing"]
    assert prior.params.timesteps == 256
    for unmasking in ("random", "fixed"):
        out = draw(prior, 50, steps=4, unmasking=unmasking)
        assert int(out.max()) < K and prior.last_sample_stats["steps"] <= 4
    assert prior.last_sample_stats["steps"] == 4  # fixed: exactly `steps` forwards
    # Inpainting half the grid: both start half-way through (the paper's process at t0 = T M / N,
    # each masked position at its own uniform time below it; steps revealing nothing are skipped).
    init = toy_codes(8)
    mask = torch.zeros_like(init, dtype=torch.bool)
    mask[:, 2:] = True
    draw(prior, 8, init=init, mask=mask, steps=16, unmasking="fixed")
    assert prior.last_sample_stats["steps"] == 8
    out = draw(prior, 1, init=init[:1], mask=mask[:1], steps=256)
    assert torch.equal(out[~mask[:1]], init[:1][~mask[:1]]) and int(out.max()) < K
    stats = prior.last_sample_stats  # 8 masked positions: at most 8 distinct reveal steps of 256
    assert 1 <= stats["steps"] <= 8 and stats["backbone_evaluations"] == stats["steps"]


def test_absorbing_losses_follow_the_reference_normalisation():
    torch.manual_seed(0)
    codes = torch.randint(0, K, (4, *GRID))
    values = {}
    prior = make("absorbing", {"timesteps": 8})
    for loss_type in ("elbo", "reweighted_elbo", "mlm"):
        prior.params = prior.Params(loss_type=loss_type, timesteps=8)
        torch.manual_seed(1)  # same t and masks for all three
        values[loss_type] = prior.loss(codes).losses["main"].item()
        torch.manual_seed(1)
        t = torch.randint(8, (4,)) + 1
        masked = torch.rand(4, 16) < (t / 8)[:, None]
    with torch.no_grad():
        x_t = torch.where(masked.view(4, *GRID), K, codes)
        logits = prior.backbone(x_t)
        ce = torch.nn.functional.cross_entropy(logits.permute(0, 3, 1, 2), codes, reduction="none").flatten(1)
        ce = (ce * masked).sum(1)
    n = 16
    assert math.isclose(values["elbo"], (ce * 8 / t / (math.log(2) * n)).mean().item(), rel_tol=1e-4)
    assert math.isclose(values["reweighted_elbo"], ((1 - t / 8) * ce / (math.log(2) * n)).mean().item(), rel_tol=1e-4)
    assert math.isclose(values["mlm"], (ce / masked.sum(1).clamp_min(1)).mean().item(), rel_tol=1e-4)


# --------------------------------------------------------------------------------------------
# autoregressive


def test_autoregressive_cached_equals_uncached(trained):
    prior = trained["autoregressive"]
    for kw in ({}, {"top_k": 3, "temperature": 1.3}, {"top_p": 0.8}):
        cached = draw(prior, 16, seed=7, **kw)
        assert prior.last_sample_stats["steps"] == 16
        assert torch.equal(cached, draw(prior, 16, seed=7, use_cache=False, **kw))
    init = toy_codes(8)
    mask = torch.rand(init.shape) < 0.4
    assert torch.equal(draw(prior, 8, seed=2, init=init, mask=mask),
                       draw(prior, 8, seed=2, init=init, mask=mask, use_cache=False))


def test_autoregressive_nll_is_the_exact_chain_rule():
    torch.manual_seed(0)
    prior = make("autoregressive", grid=(2, 2), num_classes=2, context=[[3, 1, 1]]).eval()
    k, n = K, 4
    codes = torch.randint(0, k, (5, 2, 2))
    labels = torch.randint(0, 2, (5,))
    context = [torch.randint(0, 3, (5, 1, 1))]
    with torch.inference_mode():
        nll = prior.nll(codes, labels, context)
        # Independently: feed the codes one at a time through the key/value cache.
        cache = prior.backbone.init_cache(5, torch.device("cpu"), torch.float32)
        flat, previous, total = codes.flatten(1), torch.full((5,), k), torch.zeros(5)
        for i in range(n):
            logp = prior.backbone.decode_step(previous, i, cache, labels, context).log_softmax(-1)
            total -= logp.gather(1, flat[:, i : i + 1]).squeeze(1)
            previous = flat[:, i]
    assert nll.kind == "exact"
    torch.testing.assert_close(nll.bits_per_token, total / n / math.log(2), rtol=1e-4, atol=1e-5)
    # And it is a normalised distribution: the probabilities of all k^n grids sum to one.
    small = make("autoregressive", grid=(2, 2)).eval()
    everything = torch.cartesian_prod(*[torch.arange(k)] * n).view(-1, 2, 2)
    with torch.inference_mode():
        bits = small.nll(everything).bits_per_token
    assert math.isclose(float((2 ** (-bits.double() * n)).sum()), 1.0, rel_tol=1e-4)


# --------------------------------------------------------------------------------------------
# hierarchies and larger grids


class _TwoLevels(Tokenizer):
    """A 2-level test tokenizer on 4x4 'images': a 2x2 coarse grid above a 4x4 fine grid."""

    trainable = False

    @property
    def levels(self):
        return [Level(K, 2), Level(K, 1)]

    def encode(self, images):
        raise NotImplementedError

    def decode(self, codes):
        return codes[1][:, None].float() / (K - 1) * 2 - 1


def _upsampled(coarse: torch.Tensor) -> torch.Tensor:
    return coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)


@pytest.mark.parametrize("fine_name", ["absorbing", "autoregressive"])
def test_hierarchy_samples_top_down(fine_name):
    """The fine level learns to copy its 2x2 context block; sampled top-down it must follow
    whatever the coarse prior drew."""
    torch.manual_seed(0)
    coarse = make("sundae", {"unroll_steps": 2}, grid=(2, 2)).eval()

    def data(n, g):
        top = torch.randint(0, K, (n, 2, 2), generator=g)
        return _upsampled(top), [top]

    fine = train(make(fine_name, {}, TOY_BACKBONE, context=[[K, 2, 2]]), data, steps=150)
    tokenizer = _TwoLevels(None, channels=1, resolution=[4, 4])
    result = generate(tokenizer, [coarse, fine], 32, seed=0, batch_size=16,
                      sampler=[{"steps": 8, "sample_proportion": 1.0, "sample_proportion_end": 1.0},
                               TOY_SAMPLERS[fine_name]])
    top, bottom = result.codes
    assert top.shape == (32, 2, 2) and bottom.shape == (32, 4, 4)
    assert len(set(map(tuple, top.flatten(1).tolist()))) > 16, "coarse samples should vary"
    assert (bottom == _upsampled(top)).flatten(1).all(1).float().mean() >= 0.9


@pytest.mark.parametrize("name", ["sundae", "absorbing"])
def test_larger_than_training_grids_by_windows(trained, name):
    prior = trained[name]
    steps = 8
    sampler = dict(TOY_SAMPLERS[name], steps=steps)
    if name == "sundae":
        sampler.update(self_stopping=False, min_steps=0)
    out = draw(prior, 20, grid=(8, 6), window_stride=2, **sampler)
    stats = prior.last_sample_stats
    assert out.shape == (20, 8, 6) and int(out.max()) < K
    windows = 3 * 2  # row origins 0, 2, 4; column origins 0, 2
    assert stats["steps"] == steps and stats["windows"] == windows
    assert stats["backbone_evaluations"] == steps * 20 * windows  # all windows in one forward per step
    # The whole 8x6 grid follows the structure, not just each window. Absorbing needs the
    # authors' setting for it: one code per step in raster order at a low temperature, so a new
    # code always sits next to decided ones (averaged with windows that see nothing decided yet,
    # a far-away first guess would be independent). SUNDAE revises its guesses and needs no help.
    if name == "absorbing":
        sampler = dict(steps=48, unmasking="fixed", reveal_order="raster", temperature=0.3)
    else:
        sampler = dict(SUNDAE_TOY_SAMPLER, steps=48)
    out = draw(prior, 40, grid=(8, 6), window_stride=1, **sampler)
    assert obeys(out).float().mean() >= 0.8


def test_windows_split_and_merge():
    w = Windows((6, 7), (4, 4), (1, 2))
    x = torch.arange(2 * 6 * 7).view(2, 6, 7)
    parts = w.split(x)
    assert parts.shape == (2 * w.count, 4, 4) and w.count == 3 * 3  # rows 0,1,2; cols 0,2,3
    assert torch.equal(parts[w.count + 1], x[1, 0:4, 2:6])
    merged = w.merge(torch.nn.functional.one_hot(parts, 84).float())
    assert torch.equal(merged.argmax(-1), x) and torch.allclose(merged.sum(-1), torch.ones(2, 6, 7))
    coarse = torch.arange(2 * 3 * 4).view(2, 3, 4)
    assert torch.equal(Windows((6, 8), (4, 4), (2, 2)).split_coarse(coarse)[1], coarse[0, 0:2, 1:3])
    with pytest.raises(ValueError, match="multiple of 2"):
        Windows((6, 8), (4, 4), (1, 1)).split_coarse(coarse)


def test_categorical_and_filters():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 1.0, 0.0, 3.0]]).repeat(4000, 1)
    counts = torch.bincount(categorical(probs, g), minlength=4)
    assert counts[0] == counts[2] == 0 and 0.7 < counts[3] / 4000 < 0.8
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = filter_logits(logits, top_p=0.7)  # 0.64 alone is not enough: the top two stay
    assert torch.isfinite(kept[0, 2:]).all() and torch.isinf(kept[0, :2]).all()
