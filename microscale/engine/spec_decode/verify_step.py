"""A step's tokens when some sequences speculate: plain rows sampled as usual, speculating rows' drafts verified
by rejection sampling, from the one forward's logits (a speculating chunk has a row per draft and one more)."""

from __future__ import annotations

import torch

from microscale.engine.sampler import SampledTokens, Sampler, SamplingRow, sample
from microscale.engine.scheduler import ScheduledChunk
from microscale.engine.spec_decode.rejection import VerifyBatch, rejection_sample


def sample_step(
    sampler: Sampler, logits: torch.Tensor, chunks: list[ScheduledChunk], rows: list[SamplingRow], eos_ids: list[int],
    vocab_size: int,
) -> tuple[SampledTokens, dict[int, list[int]]]:
    """The sampled tokens of the chunks without drafts (rows: indices into `chunks`, whose sampling rows `rows`
    are), and per speculating chunk's index its emitted tokens (accepted drafts, then one more)."""
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
    batch = VerifyBatch.build(logits[positions], [rows[i] for i in speculating],
                              [chunks[i].draft_token_ids for i in speculating], eos_ids, vocab_size)
    return tokens, dict(zip(speculating, rejection_sample(batch).to_host(), strict=True))
