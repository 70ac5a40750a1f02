"""A step's tokens when some sequences speculate: plain rows sampled as usual, speculating rows' drafts verified
by rejection sampling, from the one forward's logits (a speculating chunk has a row per draft and one more)."""

from __future__ import annotations

import torch

from microscale.engine.sampler import SampledTokens, Sampler, SamplingRow, VerifiedTokens, sample
from microscale.engine.scheduler import ScheduledChunk
from microscale.engine.spec_decode.rejection import VerifyBatch, rejection_sample


def sample_step(
    sampler: Sampler, logits: torch.Tensor, chunks: list[ScheduledChunk], rows: list[SamplingRow], eos_ids: list[int],
    vocab_size: int,
) -> tuple[SampledTokens, dict[int, VerifiedTokens]]:
    """The sampled tokens of the chunks without drafts (rows: indices into `chunks`, whose sampling rows `rows`
    are), and per speculating chunk's index its emitted tokens (accepted drafts, then one more) with their
    logprobs when asked for."""
    if not any(c.draft_token_ids for c in chunks):
        return sample(sampler, logits, rows, eos_ids, vocab_size), {}
    starts, offset = [], 0
    for c in chunks:
        starts.append(offset)
        offset += 1 + len(c.draft_token_ids)
    plain = [i for i, c in enumerate(chunks) if not c.draft_token_ids]
    speculating = [i for i, c in enumerate(chunks) if c.draft_token_ids]
    tokens = sample(sampler, logits[[starts[i] for i in plain]], [rows[i] for i in plain], eos_ids, vocab_size)
    tokens.rows = [plain[r] for r in tokens.rows]
    tokens.failed = {plain[r]: error for r, error in tokens.failed.items()}
    positions = [starts[i] + j for i in speculating for j in range(1 + len(chunks[i].draft_token_ids))]
    verify_logits = logits[positions]
    batch = VerifyBatch.build(verify_logits, [rows[i] for i in speculating],
                              [chunks[i].draft_token_ids for i in speculating], eos_ids, vocab_size)
    emitted = rejection_sample(batch, _draft_probs([chunks[i] for i in speculating], batch)).to_host()
    verified = {i: VerifiedTokens(ids, num_drafts=len(chunks[i].draft_token_ids))
                for i, ids in zip(speculating, emitted, strict=True)}
    _add_logprobs(verified, verify_logits, [rows[i] for i in speculating], speculating, chunks)
    return tokens, verified


def _draft_probs(chunks: list[ScheduledChunk], batch: VerifyBatch) -> torch.Tensor | None:
    """[R, K, V]: the distributions the drafts were drawn from, a point mass on each draft where the proposer
    gave none (n-gram, or a draft model's greedy rows); None when no chunk has any."""
    if all(c.draft_probs is None for c in chunks):
        return None
    rows, width = batch.draft_token_ids.shape
    vocab = next(c.draft_probs for c in chunks if c.draft_probs is not None).shape[-1]
    probs = torch.zeros(rows, width, vocab, device=batch.draft_token_ids.device)
    for r, c in enumerate(chunks):
        count = len(c.draft_token_ids)
        if c.draft_probs is None:
            probs[r, torch.arange(count), batch.draft_token_ids[r, :count]] = 1.0
        else:
            probs[r, :count] = c.draft_probs.to(probs.device)
    return probs


def _add_logprobs(verified: dict[int, VerifiedTokens], logits: torch.Tensor, rows: list[SamplingRow],
                  speculating: list[int], chunks: list[ScheduledChunk]) -> None:
    """Each emitted token's logprobs from the raw logits at its position (as the sampler gives a sampled token's),
    for the speculating rows whose request asked for them."""
    wanted, flat, tokens, start = [], [], [], 0
    for i, row in zip(speculating, rows, strict=True):
        if row.params.logprobs is not None:
            ids = verified[i].token_ids
            wanted.append((i, row.params.logprobs, len(flat)))
            flat += range(start, start + len(ids))
            tokens += ids
        start += 1 + len(chunks[i].draft_token_ids)
    if not wanted:
        return
    raw = logits[flat].float().log_softmax(dim=-1)
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None])
    ranks = ((raw > chosen).sum(dim=-1) + 1).tolist()
    top_logprobs, top_ids = raw.topk(max(max(n for _, n, _ in wanted), 1), dim=-1)
    chosen, top_logprobs, top_ids = chosen[:, 0].tolist(), top_logprobs.tolist(), top_ids.tolist()
    for i, top_n, first in wanted:
        span = range(first, first + len(verified[i].token_ids))
        verified[i].logprobs = [(chosen[k], ranks[k], top_ids[k][:top_n], top_logprobs[k][:top_n]) for k in span]
