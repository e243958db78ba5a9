"""MaskGIT's schedule and decoding step against the authors' code; guidance for maskgit and absorbing.

Reference: google-research/maskgit at commit 1db23594e1bd328ee78eadcd148a19281cd0f5b8,
``maskgit/libml/mask_schedule.py`` (``schedule``: cosine cos(pi/2 r), uniform 1 - r, pow p
1 - r^p, clipped to [1e-6, 1]) and ``maskgit/libml/parallel_decode.py`` (``decode`` loop body and
``mask_by_random_topk``: mask_len = floor(unknown_at_start * schedule((t+1)/T)), clamped to
[1, unknown - 1]; confidence = log p(sampled) + choice_temperature * (1 - ratio) * gumbel;
known tokens have confidence +inf; the mask_len lowest are masked again). The ``_reference_*``
functions are minimal transcriptions of those formulas into torch (marked as such); the first
cosine mask lengths of the authors' 256-token, 12-step ImageNet setting are also written out.
"""

import math

import pytest
import torch
from genfw_maskgit.schedule import mask_ratio, remask

import genfw

BACKBONE = {"name": "transformer", "params": {"dim": 16, "depth": 1, "heads": 2}}


# ---- minimal transcriptions of the reference (google-research/maskgit, see docstring) ----
def _reference_schedule(ratio: float, method: str) -> float:
    if method == "uniform":
        r = 1.0 - ratio
    elif method.startswith("pow"):
        r = 1.0 - ratio ** float(method[3:])
    else:  # cosine
        r = math.cos(math.pi / 2.0 * ratio)
    return min(max(r, 1e-6), 1.0)


def _reference_remask(selected_probs, unknown_map, unknown_at_start, step, num_iter, method, choice_temperature,
                      gumbel_noise):
    ratio = 1.0 * (step + 1) / num_iter
    mask_ratio_ = _reference_schedule(ratio, method)
    selected_probs = torch.where(unknown_map, selected_probs, torch.full_like(selected_probs, math.inf))
    mask_len = torch.floor(unknown_at_start.double() * mask_ratio_)[:, None]
    mask_len = torch.maximum(torch.ones_like(mask_len),
                             torch.minimum(unknown_map.sum(-1, keepdim=True).double() - 1, mask_len))
    confidence = torch.log(selected_probs.double()) + choice_temperature * (1.0 - ratio) * gumbel_noise.double()
    sorted_confidence = torch.sort(confidence, dim=-1).values
    cut_off = torch.take_along_dim(sorted_confidence, mask_len.long(), dim=-1)
    return confidence < cut_off


@pytest.mark.parametrize(("ours", "theirs"), [("cosine", "cosine"), ("linear", "uniform"), ("sqrt", "pow0.5"),
                                              ("square", "pow2")])
def test_mask_schedule_equals_the_reference(ours, theirs):
    for r in [0.0, 1 / 12, 0.25, 0.5, 0.7, 11 / 12, 1.0]:
        assert mask_ratio(r, ours) == pytest.approx(_reference_schedule(r, theirs), abs=1e-12)
    if ours == "cosine":  # 256 tokens, 12 steps: tokens still masked after the first steps
        assert [math.floor(256 * mask_ratio((t + 1) / 12, "cosine")) for t in range(4)] == [253, 247, 236, 221]


def test_decoding_step_keeps_the_same_tokens_as_the_reference():
    g = torch.Generator().manual_seed(3)
    b, n = 4, 32
    unknown = torch.rand(b, n, generator=g) < 0.7
    unknown[3] = False
    unknown[3, :2] = True  # a sample with 2 unknown tokens: at least one revealed, one kept masked
    at_start = unknown.sum(1) + torch.tensor([0, 5, 9, 0])  # some were revealed at earlier steps
    probs = torch.rand(b, n, generator=g).clamp_min(1e-3)
    noise = -torch.log(-torch.log(torch.rand(b, n, generator=g)))
    for step, steps, schedule, theirs, tau in [(0, 12, "cosine", "cosine", 4.5), (3, 8, "linear", "uniform", 1.0),
                                               (5, 12, "sqrt", "pow0.5", 0.0), (6, 8, "square", "pow2", 2.0)]:
        ours = remask(probs, unknown, at_start, (step + 1) / steps, schedule, tau, noise)
        ref = _reference_remask(probs, unknown, at_start, step, steps, theirs, tau, noise)
        assert torch.equal(ours, ref), (step, schedule)
        assert not (ours & ~unknown).any()  # known tokens never masked again
        assert (ours.sum(1) < unknown.sum(1)).all()  # at least one revealed


def test_training_masks_follow_the_cosine_schedule():
    prior = genfw.build("prior", "maskgit", {}, codebook_size=8, grid=[4, 4], backbone=BACKBONE)
    r = torch.tensor([0.0, 0.3, 0.6, 0.99])
    masks = prior.masks((4, 4, 4), r, "cosine")
    expected = [min(16, max(1, math.ceil(16 * math.cos(math.pi / 2 * float(x))))) for x in r]
    assert masks.flatten(1).sum(1).tolist() == expected


def test_sampling_reveals_by_the_schedule_and_inpaints():
    prior = genfw.build("prior", "maskgit", {}, codebook_size=8, grid=[4, 4], backbone=BACKBONE).eval()
    seen = []
    forward = prior.backbone.forward

    def spy(x, **kw):
        seen.append(int((x == prior.mask_id).sum(dim=(1, 2))[0]))
        return forward(x, **kw)

    prior.backbone.forward = spy
    g = torch.Generator().manual_seed(0)
    out = prior.sample(2, generator=g, steps=4, schedule="cosine")
    assert out.shape == (2, 4, 4) and int(out.max()) < 8
    # masked before each step: 16, then floor(16 gamma(t/4)) for t = 1, 2, 3
    assert seen == [16] + [math.floor(16 * math.cos(math.pi / 2 * t / 4)) for t in (1, 2, 3)]
    assert prior.last_sample_stats["steps"] == 4
    seen.clear()
    init = torch.randint(0, 8, (2, 4, 4))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 2:] = True  # regenerate 8 of 16: the schedule runs over those 8
    out = prior.sample(2, init=init, mask=mask, generator=g, steps=4)
    assert torch.equal(out[~mask], init[~mask])
    assert seen == [8] + [math.floor(8 * math.cos(math.pi / 2 * t / 4)) for t in (1, 2, 3)]
    big = prior.sample(1, generator=g, steps=3, grid=(4, 6))
    assert big.shape == (1, 4, 6) and prior.last_sample_stats["windows"] == 3


class _LabelBackbone(torch.nn.Module):
    """A fixed 'network': conditional logits favour the token equal to the label, the null class none."""

    def __init__(self, k: int, null: int, strength: float = 1.0) -> None:
        super().__init__()
        self.k, self.null, self.strength = k, null, strength
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a device for the prior

    def forward(self, x, labels=None, context=None, causal=False):
        b, h, w = x.shape
        logits = torch.zeros(b, h, w, self.k)
        cond = labels != self.null
        logits[cond] += self.strength * torch.nn.functional.one_hot(labels[cond], self.k).float()[:, None, None]
        return logits


@pytest.mark.parametrize("name", ["maskgit", "absorbing", "autoregressive", "sundae"])
def test_classifier_free_guidance_raises_label_agreement(name):
    params = {"label_drop": 0.1, **({"timesteps": 8} if name == "absorbing" else {})}
    prior = genfw.build("prior", name, params, codebook_size=6, grid=[4, 4], num_classes=3, backbone=BACKBONE)
    assert prior.null_class == 3
    prior.backbone = _LabelBackbone(6, prior.null_class)
    prior.eval()
    labels = torch.arange(3).repeat(40)
    # MaskGIT keeps confident draws, which favours the label; a large choice temperature makes the kept
    # positions random, so each token's marginal is the guided softmax, as in absorbing's random order.
    extra = {"maskgit": {"choice_temperature": 1e4, "steps": 4}, "absorbing": {"steps": 4, "unmasking": "fixed"},  # every sample runs every step
             "autoregressive": {"use_cache": False},  # the fixed network has no key/value cache
             # every position redrawn at every step: the last step's draws are the sample
             "sundae": {"steps": 4, "sample_proportion": 1.0, "self_stopping": False, "temperature": 1.0}}[name]

    def agreement(**kw):
        g = torch.Generator().manual_seed(0)
        x = prior.sample(len(labels), labels=labels, generator=g, **extra, **kw)
        return float((x == labels[:, None, None]).float().mean())

    plain, guided = agreement(), agreement(guidance_scale=3.0)
    # exactly: p(label) = e^s / (e^s + 5) per token under scale s (the unconditional logits are 0)
    assert plain == pytest.approx(math.e / (math.e + 5), abs=0.06)
    assert guided == pytest.approx(math.e ** 3 / (math.e ** 3 + 5), abs=0.06)
    ramped = agreement(guidance_scale=3.0, guidance_schedule="linear")
    if name == "sundae":  # the sample is the last step's draw, made at the full scale
        assert ramped == guided
    else:
        assert plain < ramped < guided
    forwards = prior.last_sample_stats["steps"]
    assert prior.last_sample_stats["backbone_evaluations"] == 2 * forwards * len(labels)  # doubled batch per step
    if name == "absorbing":  # the paper's 1/t process: only samples revealing something run, doubled
        rows = {}
        for scale in (1.0, 3.0):
            prior.sample(len(labels), labels=labels, generator=torch.Generator().manual_seed(0), steps=4,
                         unmasking="random", guidance_scale=scale)
            rows[scale] = prior.last_sample_stats["backbone_evaluations"]
        assert rows[3.0] == 2 * rows[1.0] < 2 * 4 * len(labels)
    with pytest.raises(ValueError, match="needs labels"):  # guidance without labels: nothing to guide towards
        prior.sample(2, **extra, guidance_scale=2.0)
    with pytest.raises(ValueError, match="label_drop"):
        genfw.build("prior", name, params | {"label_drop": 0.0}, codebook_size=6, grid=[4, 4], num_classes=3,
                    backbone=BACKBONE).sample(2, labels=labels[:2], **extra, guidance_scale=2.0)


def test_guided_autoregressive_cached_and_uncached_agree():
    prior = genfw.build("prior", "autoregressive", {"label_drop": 0.2}, codebook_size=6, grid=[3, 3], num_classes=3,
                        backbone=BACKBONE).eval()
    labels = torch.tensor([0, 2])
    a, b = (prior.sample(2, labels=labels, generator=torch.Generator().manual_seed(5), guidance_scale=2.5,
                         guidance_schedule="cosine", use_cache=c) for c in (True, False))
    assert torch.equal(a, b)


def test_guidance_trains_with_the_null_class():
    prior = genfw.build("prior", "absorbing", {"timesteps": 8, "label_drop": 0.5}, codebook_size=6, grid=[2, 2],
                        num_classes=3, backbone=BACKBONE)
    seen = []
    forward = prior.backbone.forward
    prior.backbone.forward = lambda x, labels=None, **kw: (seen.append(labels.clone()), forward(x, labels=labels, **kw))[1]
    torch.manual_seed(0)
    prior.loss(torch.randint(0, 6, (200, 2, 2)), torch.zeros(200, dtype=torch.long))
    dropped = float((seen[0] == 3).float().mean())
    assert 0.4 < dropped < 0.6 and set(seen[0].tolist()) == {0, 3}
