"""Absorbing diffusion's sampling processes against exact computation on a tiny case.

Four tokens (a 2x2 grid), three codes, and a fixed "network": a table of logits for every one of
the 4^4 inputs (three codes and the mask). On it the reverse processes and the ELBO of
Unleashing Transformers (eq. 6) are sums over finitely many terms, computed here exactly:

- ``unmasking: random`` (the paper's process: each still-masked position unmasked w.p. 1/t, or
  (t - t')/t when skipping from t to t') draws reveal steps and final sequences with the exact
  probabilities, and the ELBO is >= its exact NLL for every sequence;
- ``unmasking: fixed`` (a fixed number of positions per step) is a different process, and the
  ELBO can be below its NLL: the ELBO is not a bound for it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from genfw.registry import build

N, K, MASK = 4, 3, 3  # tokens, codes, the absorbing state (= K, as in the prior)
SEQUENCES = list(itertools.product(range(K), repeat=N))  # the 81 outcomes


class TableNet(nn.Module):
    """A "backbone" that looks its logits up: one row of [N, K] logits per input sequence."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)  # [(K+1)^N, N, K]

    def forward(self, x: torch.Tensor, labels=None, context=None, causal=False) -> torch.Tensor:
        flat = x.flatten(1)
        index = (flat * (K + 1) ** torch.arange(N)).sum(1)
        return self.table[index].view(x.shape[0], 2, 2, K)


def state_index(state: tuple[int, ...]) -> int:
    return sum(v * (K + 1) ** i for i, v in enumerate(state))


def random_table(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn((K + 1) ** N, N, K, generator=torch.Generator().manual_seed(seed)) * scale


def agreeing_table() -> torch.Tensor:
    """Uniform while everything is masked; once codes are revealed, near-certain that every other
    token equals them. Revealing two tokens at once (independently) then often contradicts."""
    table = torch.zeros((K + 1) ** N, N, K)
    for state in itertools.product(range(K + 1), repeat=N):
        seen = {v for v in state if v != MASK}
        if len(seen) == 1:
            table[state_index(state), :, seen.pop()] = 12.0
    return table


def prior_with(table: torch.Tensor, timesteps: int):
    prior = build("prior", "absorbing", {"timesteps": timesteps}, codebook_size=K, grid=[2, 2],
                  backbone={"name": "transformer", "params": {"dim": 8, "depth": 1, "heads": 1}})
    prior.backbone = TableNet(table)
    return prior.eval()


# --------------------------------------------------------------------------------------------
# exact computation


def taus(T: int, S: int) -> list[int]:
    """The timesteps the S-step process visits: tau_0 = 0 < ... < tau_S = T (as the prior does)."""
    return [k * T // S for k in range(S + 1)]


def conditionals(table: torch.Tensor) -> list:
    return table.double().softmax(-1).tolist()  # [(K+1)^N][N][K]: p(x0_i | state), as lists (fast)


def path_probability(probs: list, x: tuple[int, ...], step_of: tuple[int, ...], S: int) -> float:
    """p(x | which step reveals each position): each step draws its positions from p(x0 | state).
    A position with step 0 is known from the start."""
    state, p = [x[i] if step_of[i] == 0 else MASK for i in range(N)], 1.0
    for s in range(1, S + 1):
        revealed = [i for i in range(N) if step_of[i] == s]
        row = probs[state_index(tuple(state))]
        for i in revealed:
            p *= row[i][x[i]]
        for i in revealed:
            state[i] = x[i]
    return p


def step_weights(T: int, S: int) -> list[float]:
    """P(a position is revealed at step s), s = 1..S: (tau_k - tau_{k-1}) / T with k = S - s + 1."""
    tau = taus(T, S)
    return [(tau[S - s + 1] - tau[S - s]) / T for s in range(1, S + 1)]


def random_process(table: torch.Tensor, T: int, S: int) -> dict[tuple[int, ...], float]:
    """Exact p(x) of ``unmasking: random``: reveal steps independent, P(step s) = step_weights."""
    probs, w = conditionals(table), step_weights(T, S)
    out = {}
    for x in SEQUENCES:
        out[x] = sum(math.prod(w[s - 1] for s in a) * path_probability(probs, x, a, S)
                     for a in itertools.product(range(1, S + 1), repeat=N))
    return out


def inpainting_process(table: torch.Tensor, T: int, S: int, known: dict[int, int]) -> dict[tuple, float]:
    """Exact p(x) of ``unmasking: random`` inpainting: the known positions fixed, the process
    started at t0 = round(T M / N) for M masked, each masked position's time uniform on 1..t0."""
    probs, tau = conditionals(table), taus(T, S)
    masked = [i for i in range(N) if i not in known]
    t0 = max(1, round(T * len(masked) / N))
    # P(step s): the share of 1..t0 inside (tau_{k-1}, tau_k], k = S - s + 1.
    w = [sum(1 for t in range(1, t0 + 1) if tau[S - s] < t <= tau[S - s + 1]) / t0 for s in range(1, S + 1)]
    out = {}
    for x in SEQUENCES:
        if any(x[i] != v for i, v in known.items()):
            continue
        total = 0.0
        for a in itertools.product(range(1, S + 1), repeat=len(masked)):
            step_of = [0] * N
            for i, s in zip(masked, a):
                step_of[i] = s
            total += math.prod(w[s - 1] for s in a) * path_probability(probs, x, tuple(step_of), S)
        out[x] = total
    return out


def fixed_process(table: torch.Tensor, S: int) -> dict[tuple[int, ...], float]:
    """Exact p(x) of ``unmasking: fixed``: round(N (S - s) / S) masked after step s, random order."""
    probs = conditionals(table)
    after = [N - round(N * (S - s) / S) for s in range(S + 1)]
    perms = list(itertools.permutations(range(N)))
    out = {}
    for x in SEQUENCES:
        total = 0.0
        for order in perms:
            step_of = [0] * N
            for s in range(1, S + 1):
                for r in range(after[s - 1], after[s]):
                    step_of[order[r]] = s
            total += path_probability(probs, x, tuple(step_of), S)
        out[x] = total / len(perms)
    return out


def elbo_bits(table: torch.Tensor, x: tuple[int, ...], T: int, S: int | None = None) -> float:
    """eq. 6 exactly, in bits per token: sum over the visited t of ((t - t') / t) E_mask[CE of the
    masked tokens], each token masked w.p. t / T. S = T (t' = t - 1) is the paper's eq. 6."""
    probs, tau = conditionals(table), taus(T, S or T)
    total = 0.0
    for k in range(1, len(tau)):
        t, q = tau[k], tau[k] / T
        for masked in itertools.product([False, True], repeat=N):
            weight = math.prod(q if m else 1 - q for m in masked)
            state = tuple(MASK if m else v for v, m in zip(x, masked))
            row = probs[state_index(state)]
            ce = -sum(math.log(row[i][x[i]]) for i in range(N) if masked[i])
            total += (t - tau[k - 1]) / t * weight * ce
    return total / (math.log(2) * N)


def nll_bits(p: float) -> float:
    return -math.log2(p) / N


def chi2_pvalue(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value (categories with expected count >= 5)."""
    expected = expected_p * observed.sum()
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).double()
    if exp[-1] < 5:  # fold the rare tail into the smallest kept category
        obs, exp = obs[:-1], exp[:-1]
        obs[exp.argmin()] += observed[~keep].sum()
        exp[exp.argmin()] += expected[~keep].sum()
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


def histogram(samples: torch.Tensor) -> torch.Tensor:
    index = (samples.flatten(1) * K ** torch.arange(N).flip(0)).sum(1)  # product order of SEQUENCES
    return torch.bincount(index, minlength=K ** N).double()


# --------------------------------------------------------------------------------------------
# the paper's process


@pytest.mark.parametrize(("T", "S"), [(4, 4), (4, 2), (6, 4)])
def test_reveal_counts_per_step_follow_the_papers_process(T, S):
    """How many positions each step unmasks, jointly over the steps: multinomial(N, step_weights),
    which is what unmasking each still-masked position w.p. (t - t')/t at every step gives."""
    prior = prior_with(random_table(0), T)
    sp = prior.sampler_params(steps=S)
    draws = 60_000
    when = prior.reveal_steps(torch.ones(draws, N, dtype=torch.bool), sp, torch.Generator().manual_seed(0))
    counts = torch.stack([(when == s).sum(1) for s in range(1, S + 1)], 1)  # draws, S
    assert int(counts.sum(1).min()) == N  # every position revealed exactly once
    vectors = [c for c in itertools.product(range(N + 1), repeat=S) if sum(c) == N]
    w = step_weights(T, S)
    exact = torch.tensor([math.factorial(N) / math.prod(math.factorial(c) for c in v)
                          * math.prod(wi ** ci for wi, ci in zip(w, v)) for v in vectors], dtype=torch.double)
    observed = torch.tensor([float((counts == torch.tensor(v)).all(1).sum()) for v in vectors])
    assert chi2_pvalue(observed, exact) > 1e-3
    # The sequential view: given m still masked before step s, the count is Binomial(m, (t - t')/t).
    tau = taus(T, S)
    before = N - torch.cat([torch.zeros(draws, 1, dtype=torch.long), counts.cumsum(1)[:, :-1]], 1)
    for s in range(1, S + 1):
        t, t_next = tau[S - s + 1], tau[S - s]
        rate = counts[:, s - 1].sum() / before[:, s - 1].sum()
        assert abs(float(rate) - (t - t_next) / t) < 0.01, (s, float(rate))
    # The fixed schedule is a different process: N / S positions every step, always.
    fixed = prior.reveal_steps(torch.ones(5, N, dtype=torch.bool), prior.sampler_params(steps=S, unmasking="fixed"))
    per_step = torch.stack([(fixed == s).sum(1) for s in range(1, S + 1)], 1)
    assert torch.equal(per_step, torch.tensor([N - round(N * (S - s) / S) - (N - round(N * (S - s + 1) / S))
                                               for s in range(1, S + 1)]).expand(5, S))


def test_reveal_steps_with_an_inpainting_mask_and_raster_order():
    prior = prior_with(random_table(0), 8)
    masked = torch.tensor([[True, False, True, False]]).expand(40_000, N)
    for order in ("random", "raster"):
        when = prior.reveal_steps(masked, prior.sampler_params(steps=4, reveal_order=order),
                                  torch.Generator().manual_seed(1))
        assert bool((when[:, [1, 3]] == 5).all())  # known positions are never revealed
        # Half the grid masked: the process starts at t0 = T * 2/4 = 4 (the paper counts the masked
        # latents), so each masked position's time is uniform on 1..4: steps 3 (t 3-4) and 4 (t 1-2).
        both = when[:, [0, 2]]
        for s, expected in zip(range(1, 5), (0, 0, 0.5, 0.5)):
            share = float((both == s).double().mean())
            assert abs(share - expected) < 0.01, (order, s, share)
        if order == "raster":
            assert bool((when[:, 0] <= when[:, 2]).all())  # the raster-first position never comes later
        else:  # independent: both in the same step w.p. sum_s w_s^2 = 1/2
            assert abs(float((both[:, 0] == both[:, 1]).double().mean()) - 0.5) < 0.01


@pytest.mark.parametrize(("T", "S"), [(4, 4), (4, 2)])
def test_sampled_sequences_follow_the_papers_process_exactly(T, S):
    """End to end through ``sample()``: the distribution of final sequences over many draws is the
    exact p(x) of the paper's process, and not that of the fixed-count schedule."""
    table = agreeing_table() * 0.25 + random_table(1, 1.0)  # correlated enough that the processes differ
    prior = prior_with(table, T)
    with torch.inference_mode():
        out = prior.sample(40_000, generator=torch.Generator().manual_seed(2), steps=S)
    observed = histogram(out)
    exact = torch.tensor(list(random_process(table, T, S).values()), dtype=torch.double)
    assert abs(float(exact.sum()) - 1) < 1e-9
    assert chi2_pvalue(observed, exact) > 1e-3
    other = torch.tensor(list(fixed_process(table, S).values()), dtype=torch.double)
    assert chi2_pvalue(observed, other) < 1e-6  # the test can tell the two processes apart
    with torch.inference_mode():  # and the fixed schedule's own samples follow its own process
        fixed = prior.sample(40_000, generator=torch.Generator().manual_seed(3), steps=S, unmasking="fixed")
    assert chi2_pvalue(histogram(fixed), other) > 1e-3


def test_inpainting_follows_the_papers_process_from_the_counted_timestep():
    """Positions 1 and 3 known: the process starts at t0 = T * 2/4 and completes 0 and 2 with the
    exact probabilities; the known codes never change."""
    table, T, S = agreeing_table() * 0.25 + random_table(1, 1.0), 8, 4
    prior = prior_with(table, T)
    init = torch.tensor([0, 2, 0, 1]).view(1, 2, 2).expand(40_000, 2, 2)
    mask = torch.tensor([True, False, True, False]).view(1, 2, 2).expand(40_000, 2, 2)
    with torch.inference_mode():
        out = prior.sample(40_000, init=init, mask=mask, generator=torch.Generator().manual_seed(6), steps=S)
    assert torch.equal(out[~mask], init[~mask])
    assert prior.last_sample_stats["steps"] == 2  # steps 3 and 4: timesteps 1..4 of 8
    exact = inpainting_process(table, T, S, {1: 2, 3: 1})
    observed = histogram(out)[[SEQUENCES.index(x) for x in exact]]
    assert abs(sum(exact.values()) - 1) < 1e-9
    assert chi2_pvalue(observed, torch.tensor(list(exact.values()), dtype=torch.double)) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_elbo_bounds_the_nll_of_the_papers_process(seed):
    T = 4
    for table in (random_table(seed), agreeing_table()):
        exact = random_process(table, T, T)
        for x in SEQUENCES:
            assert elbo_bits(table, x, T) >= nll_bits(exact[x]) - 1e-12, x
        # With S < T steps the S-step ELBO (the same sum over the visited timesteps) bounds it.
        skipped = random_process(table, T, 2)
        for x in SEQUENCES:
            assert elbo_bits(table, x, T, 2) >= nll_bits(skipped[x]) - 1e-12, x


def test_prior_nll_is_an_unbiased_estimate_of_the_exact_elbo():
    table, T = random_table(3), 4
    prior = prior_with(table, T)
    x = (0, 2, 1, 1)
    codes = torch.tensor(x).view(1, 2, 2).expand(20_000, 2, 2)
    with torch.inference_mode():
        out = prior.nll(codes, generator=torch.Generator().manual_seed(4))
    assert out.kind == "bound" and "unmasking: random" in prior.nll_bounds
    mean, sem = float(out.bits_per_token.mean()), float(out.bits_per_token.std() / math.sqrt(20_000))
    assert abs(mean - elbo_bits(table, x, T)) < 4 * sem


def test_elbo_is_not_a_bound_for_the_fixed_count_schedule():
    """Two tokens a step (S = T/2, as a study sampling T = 64 in 32 steps does): the ELBO is below
    the exact NLL of the fixed-count process, here by 0.17 bits per token; and at S = T on a
    random table by 0.17 too."""
    T, S, table = 4, 2, agreeing_table()
    x = (1, 1, 1, 1)
    fixed = nll_bits(fixed_process(table, S)[x])
    elbo = elbo_bits(table, x, T)
    assert elbo < fixed - 0.15, (elbo, fixed)
    assert elbo >= nll_bits(random_process(table, T, T)[x])  # while it does bound the paper's process
    with torch.inference_mode():  # and sample() really runs that process: contradicting pairs appear
        out = prior_with(table, T).sample(4000, generator=torch.Generator().manual_seed(5), steps=S,
                                          unmasking="fixed")
    agree = (out.flatten(1) == out.flatten(1)[:, :1]).all(1).double().mean()
    assert abs(float(agree) - sum(fixed_process(table, S)[(v,) * N] for v in range(K))) < 0.03
    # Not only with skipped steps: one position a step (S = T = 4), on a random table.
    table, x = random_table(1, 3.0), (2, 1, 2, 0)
    assert elbo_bits(table, x, T) < nll_bits(fixed_process(table, T)[x]) - 0.15
    assert elbo_bits(table, x, T) >= nll_bits(random_process(table, T, T)[x])


def test_metrics_say_which_process_the_bound_is_for():
    from genfw.metrics import prior_nll

    prior = prior_with(random_table(0), 4)
    codes = torch.zeros(3, 2, 2, dtype=torch.long)
    out = prior_nll(prior, [{"codes": codes}], generator=torch.Generator().manual_seed(0))
    assert out["nll_kind"] == "bound"
    assert "unmasking: random" in out["nll_bounds"] and "not a bound for unmasking: fixed" in out["nll_bounds"]
