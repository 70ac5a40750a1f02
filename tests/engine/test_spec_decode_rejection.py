"""The rejection sampler: greedy rows emit exactly what step-by-step greedy decoding would (penalties and
min_tokens counted per position), seeded rows do not depend on their batch, and random rows keep the target's
distribution, checked by chi-square tests (significance ALPHA, fixed seeds) that a wrong sampler fails."""

from __future__ import annotations

import pytest
import torch

from microscale.engine.sampler import Sampler, SamplingBatch, SamplingRow
from microscale.engine.spec_decode.rejection import VerifyBatch, rejection_sample
from microscale.sampling_params import SamplingParams

V = 12
EOS = 11
ALPHA = 1e-3  # each chi-square test's significance level
N = 200_000  # rows sampled at once per distribution test


def _logits(rows: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def _sequential(row: SamplingRow, logits: torch.Tensor) -> list[int]:
    """What the sampler decodes without drafts when position j's logits are logits[j]: one token at a time."""
    tokens = list(row.token_ids)
    for j in range(logits.shape[0]):
        batch = SamplingBatch.build([SamplingRow(row.params, tokens, row.num_prompt_tokens)], [EOS], V, logits.device)
        tokens.append(int(Sampler()(logits[j : j + 1], batch).token_ids[0]))
    return tokens[len(row.token_ids) :]


def test_greedy_rows_emit_the_sequential_greedy_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=1.0, min_tokens=2, max_tokens=9)
    row = SamplingRow(params, [1, 2, 3], 3)
    logits = _logits(4, seed=0)
    logits[:, EOS] = 10.0  # EOS is the argmax unless min_tokens blocks it (positions 0 and 1)
    logits[2:, 1:4] += 9.0  # the prompt's tokens win over EOS unless penalised
    expected = _sequential(row, logits)
    assert expected[:2] != [EOS, EOS] and expected != logits.argmax(dim=-1).tolist()  # the test is not trivial
    drafts_per_row = [expected[:3], expected[:1] + [(expected[1] + 1) % V, expected[2]], [], [(expected[0] + 1) % V]]
    flat = torch.cat([logits[: len(d) + 1] for d in drafts_per_row])
    batch = VerifyBatch.build(flat, [row] * len(drafts_per_row), drafts_per_row, [EOS], V)
    assert batch.target_probs is None  # all greedy: nothing random computed
    assert rejection_sample(batch).to_host() == [expected, expected[:2], expected[:1], expected[:1]]


def test_min_tokens_blocks_eos_only_at_the_positions_before_it():
    row = SamplingRow(SamplingParams(temperature=1.0, min_tokens=2), [4, 5, 6, 7], 3)  # one output token so far
    batch = VerifyBatch.build(_logits(3, seed=1), [row], [[8, 9]], [EOS], V)
    assert batch.target_probs[0, 0, EOS] == 0 and batch.target_probs[0, 1, EOS] > 0


def test_a_seeded_row_does_not_depend_on_its_batch():
    other = SamplingParams(temperature=0.9)

    def run(seed: int, with_others: bool) -> list[int]:
        torch.manual_seed(100 + with_others)  # the unseeded rows' draws differ between the two runs
        rows = [SamplingRow(SamplingParams(temperature=1.0, seed=seed), [1, 2], 2, torch.Generator().manual_seed(seed))]
        drafts = [[3, 4]]
        if with_others:
            rows += [SamplingRow(other, [5], 1), SamplingRow(other, [6], 1)]
            drafts += [[1, 2, 3, 4, 5], []]
        logits = torch.cat([_logits(len(d) + 1, seed=10 + i, scale=0.5) for i, d in enumerate(drafts)])
        logits[0, 3] += 2.5  # drafts accepted about half the time: the row's uniforms matter, not only its noise
        logits[1, 4] += 2.5
        return rejection_sample(VerifyBatch.build(logits, rows, drafts, [EOS], V)).to_host()[0]

    alone = [run(seed, False) for seed in range(8)]
    assert alone == [run(seed, True) for seed in range(8)]
    assert len({tuple(tokens) for tokens in alone}) > 1  # the seeds matter


def test_rows_of_structured_outputs_cannot_verify_drafts():
    row = SamplingRow(SamplingParams(), [1], 1, allowed=object())
    with pytest.raises(ValueError, match="structured outputs"):
        VerifyBatch.build(_logits(2, seed=0), [row], [[3]], [EOS], V)


def test_logit_rows_must_match_the_drafts():
    with pytest.raises(ValueError, match="each row needs one per draft and one more"):
        VerifyBatch.build(_logits(2, seed=0), [SamplingRow(SamplingParams(), [1], 1)], [[3, 4]], [EOS], V)


# ---- the distribution ------------------------------------------------------------------------------------


def chi_square_p_value(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """How likely a deviation this large is if `tokens` were drawn from `p` (the chi-square test's p-value).
    The least likely tokens share one cell, so that every cell expects at least 5 samples."""
    counts = torch.bincount(tokens, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0, "sampled a token the target excludes"
    expected, order = (p.double() * counts.sum()).sort()
    counts = counts[order][expected > 0]
    expected = expected[expected > 0]
    pooled = int((expected.cumsum(0) < 5).sum()) + 1  # the fewest smallest cells that together expect 5
    counts = torch.cat([counts[:pooled].sum(0, keepdim=True), counts[pooled:]])
    expected = torch.cat([expected[:pooled].sum(0, keepdim=True), expected[pooled:]])
    assert len(expected) >= 3, "too few samples for the chi-square approximation"
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


K = 2  # draft tokens per row (some rows get fewer)
TARGETS = {
    "temperature": SamplingParams(temperature=0.7),
    "top_p": SamplingParams(temperature=1.2, top_p=0.8),
    "top_k": SamplingParams(temperature=1.0, top_k=5),
    "min_p": SamplingParams(temperature=1.0, min_p=0.1),
}


def _target_probs(params: SamplingParams) -> torch.Tensor:
    """The processed target distributions of one row's K + 1 positions, [K + 1, V]."""
    batch = VerifyBatch.build(_logits(K + 1, seed=2), [SamplingRow(params, [0], 1)], [[0] * K], [EOS], V)
    return batch.target_probs[0]


def _drafted_batch(p: torch.Tensor, q: torch.Tensor) -> VerifyBatch:
    """N rows with p's positions, drafts drawn from q ([K, V]), 0 to K of them per row."""
    generator = torch.Generator().manual_seed(3)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=generator) for j in range(K)], 1)
    counts = torch.randint(0, K + 1, (N,), generator=generator)
    drafts = drafts.masked_fill(torch.arange(K) >= counts[:, None], 0)
    probs = p.expand(N, K + 1, V)
    return VerifyBatch(drafts, counts, probs.argmax(dim=-1), probs, torch.zeros(N, dtype=torch.bool), {})


def _draft_distribution(p: torch.Tensor) -> torch.Tensor:
    """A draft near the target (as a useful one is), yet different, and sure to propose what the target excludes."""
    return 0.5 * p[:K] + 0.5 * _logits(K, seed=4).softmax(dim=-1)


@pytest.mark.parametrize("draft", ["model", "point_mass"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_rejection_sampling_keeps_the_target_distribution(target, draft):
    torch.manual_seed(5)
    p = _target_probs(TARGETS[target])
    q = _draft_distribution(p)
    batch = _drafted_batch(p, q)
    # A point mass: the proposer chose each draft from the context alone (n-gram); q then is what drew them here.
    out = rejection_sample(batch, q.expand(N, K, V) if draft == "model" else None)
    tokens, lengths = out.token_ids, out.num_tokens
    assert ((lengths >= 1) & (lengths <= batch.num_draft_tokens + 1)).all()
    assert (tokens[:, :K][torch.arange(K) < (lengths - 1)[:, None]] == batch.draft_token_ids[
        torch.arange(K) < (lengths - 1)[:, None]]).all()  # the tokens before the last are the accepted drafts
    # Each emitted token, given the ones before it, follows the target at its position (here the same whatever
    # came before): the first, the second where a first draft was accepted, the third where both were.
    for j in range(K + 1):
        emitted = lengths > j
        assert chi_square_p_value(tokens[emitted, j], p[j]) > ALPHA, f"position {j}"
    assert (lengths == K + 1).any() and (lengths < batch.num_draft_tokens + 1).any()  # bonus tokens and rejections


def test_the_distribution_test_fails_wrong_samplers():
    torch.manual_seed(6)
    p = _target_probs(TARGETS["temperature"])
    q = _draft_distribution(p)
    batch = _drafted_batch(p, q)
    has_draft = batch.num_draft_tokens > 0
    drafts = batch.draft_token_ids[has_draft, 0]
    # Accepting every draft emits the draft's distribution.
    assert chi_square_p_value(drafts, p[0]) < ALPHA
    # Resampling from p instead of max(0, p - q) after a rejection double-counts the tokens the draft favours.
    accepted = torch.rand(len(drafts)) * q[0, drafts] < p[0, drafts]
    resampled = torch.multinomial(p[0], len(drafts), replacement=True)
    assert chi_square_p_value(torch.where(accepted, drafts, resampled), p[0]) < ALPHA
    # The right sampler on the same rows passes.
    first = rejection_sample(batch, q.expand(N, K, V)).token_ids[:, 0]
    assert chi_square_p_value(first, p[0]) > ALPHA
