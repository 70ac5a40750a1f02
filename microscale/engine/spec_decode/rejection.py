"""Verifying draft tokens against the target model: speculative rejection sampling (Leviathan et al. 2023,
Chen et al. 2023), which emits tokens distributed exactly as sampling the target one token at a time would.

A row (a speculating sequence) has k_i draft tokens x_1..x_k_i and the target's logits at its k_i + 1 positions
(after its last token, and after each draft). Position j's distribution p_j is processed as the sampler processes
it (penalties, min_tokens, temperature, min_p, top-k, top-p), counting drafts before j as output, which they are
whenever position j is reached. Draft x_j, drawn from the draft's q_j, is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection the row emits a token from normalize(max(0, p_j - q_j)) and
stops; if all are accepted it emits a bonus token from p_{k_i+1}. A greedy row accepts the drafts that equal the
target's argmax and then emits the argmax, which is what it would have decoded without drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from microscale.engine.sampler import SamplingBatch, SamplingRow, constrain_logits, sample_from, sampling_probs


@dataclass
class VerifyBatch:
    """The target's side of a verification, padded to K = the most drafts of any row."""

    draft_token_ids: torch.Tensor  # [R, K] int64, 0 past a row's drafts
    num_draft_tokens: torch.Tensor  # [R] int64
    target_argmax: torch.Tensor  # [R, K + 1]: the constrained logits' argmax at each position (greedy's choice)
    target_probs: torch.Tensor | None  # [R, K + 1, V] what random rows sample from; None when every row is greedy
    greedy: torch.Tensor  # [R] bool
    seeded: dict[int, torch.Generator]  # random row -> its request's generator

    @classmethod
    def build(
        cls,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        draft_token_ids: list[list[int]],
        eos_ids: list[int],
        vocab_size: int,
    ) -> VerifyBatch:
        """`logits`: [sum(len(d) + 1 for d in draft_token_ids), V], each row's positions in order, row after row
        (as a flat step lays out a sequence's last token and its drafts); `rows`: the sequences' sampling rows."""
        device = logits.device
        if logits.shape[0] != sum(len(d) + 1 for d in draft_token_ids) or len(rows) != len(draft_token_ids):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} rows with drafts of lengths "
                             f"{[len(d) for d in draft_token_ids]}: each row needs one per draft and one more.")
        positions = [_at_position(row, drafts, j)
                     for row, drafts in zip(rows, draft_token_ids, strict=True) for j in range(len(drafts) + 1)]
        batch = SamplingBatch.build(positions, eos_ids, vocab_size, device)
        constrained = constrain_logits(logits, batch)
        counts = [len(d) for d in draft_token_ids]
        width = max(counts, default=0)
        # Flat position -> (row, j) in the padded [R, K + 1] layout.
        row_index = torch.tensor([r for r, c in enumerate(counts) for _ in range(c + 1)], device=device)
        position = torch.tensor([j for c in counts for j in range(c + 1)], device=device)

        def padded(flat: torch.Tensor) -> torch.Tensor:
            out = flat.new_zeros(len(rows), width + 1, *flat.shape[1:])
            out[row_index, position] = flat
            return out

        temperature = torch.tensor([r.params.temperature for r in rows], device=device)
        return cls(
            draft_token_ids=torch.tensor([d + [0] * (width - len(d)) for d in draft_token_ids], dtype=torch.int64,
                                         device=device).reshape(len(rows), width),
            num_draft_tokens=torch.tensor(counts, dtype=torch.int64, device=device),
            target_argmax=padded(constrained.argmax(dim=-1)),
            target_probs=None if batch.all_greedy else padded(sampling_probs(constrained, batch)),
            greedy=temperature == 0,
            seeded={i: r.generator for i, r in enumerate(rows) if r.generator is not None and r.params.temperature > 0},
        )


def _at_position(row: SamplingRow, drafts: list[int], j: int) -> SamplingRow:
    """The sampling row of `row`'s position j: its drafts before j are output by then."""
    if drafts and row.allowed is not None:
        raise ValueError("a row with structured outputs cannot verify drafts: its grammar has not seen them.")
    return row.after(drafts[:j])


@dataclass
class VerifyOutput:
    token_ids: torch.Tensor  # [R, K + 1]: the accepted drafts then the corrected or bonus token, -1 after
    num_tokens: torch.Tensor  # [R]: 1 + the accepted drafts

    def to_host(self) -> list[list[int]]:
        """Each row's emitted tokens (the step's one device -> host copy)."""
        return [tokens[:n] for tokens, n in zip(self.token_ids.tolist(), self.num_tokens.tolist(), strict=True)]


def rejection_sample(batch: VerifyBatch, draft_probs: torch.Tensor | None = None) -> VerifyOutput:
    """Each row's accepted drafts and one more token. `draft_probs`: [R, K, V], the draft's (processed)
    distributions the drafts were drawn from; None: each draft was a point mass (n-gram). A seeded row draws its
    k_i uniforms, then its one token's noise, from its own generator, so its result does not depend on the batch."""
    rows, width = batch.draft_token_ids.shape
    device = batch.draft_token_ids.device
    drafts = batch.draft_token_ids
    arange = torch.arange(rows, device=device)
    has_draft = torch.arange(width, device=device) < batch.num_draft_tokens[:, None]
    accepted = drafts == batch.target_argmax[:, :width]
    if batch.target_probs is not None:
        p = batch.target_probs[:, :width].gather(2, drafts[..., None]).squeeze(2)
        q = draft_probs.gather(2, drafts[..., None]).squeeze(2) if draft_probs is not None else torch.ones_like(p)
        uniform = torch.rand(rows, width, device=device)
        counts = batch.num_draft_tokens.tolist() if batch.seeded else []  # one device -> host copy
        for row, generator in batch.seeded.items():
            count = counts[row]
            uniform[row, :count] = torch.rand(count, generator=generator).to(device)
        # u < p / q accepts with probability min(1, p / q), without dividing by q.
        accepted = torch.where(batch.greedy[:, None], accepted, uniform * q < p)
    leading = (accepted & has_draft).long().cumprod(dim=1).bool()  # the drafts before the first rejection
    num_accepted = leading.sum(dim=1)

    final = batch.target_argmax[arange, num_accepted]
    if batch.target_probs is not None:
        p_final = batch.target_probs[arange, num_accepted]  # [R, V]
        rejected = num_accepted < batch.num_draft_tokens
        at = num_accepted.clamp(max=max(width - 1, 0))  # the rejected position (a valid index for the others)
        if draft_probs is not None:
            q_final = draft_probs[arange, at]
        else:
            q_final = torch.zeros_like(p_final)
            if width:
                q_final[arange, drafts[arange, at]] = 1.0
        residual = (p_final - q_final).clamp(min=0)
        # normalize(max(0, p - q)) at a rejection; a residual that rounding left all zero falls back to p.
        use_residual = rejected & (residual.sum(dim=1) > 0)
        sampled = sample_from(torch.where(use_residual[:, None], residual, p_final), batch.seeded)
        final = torch.where(batch.greedy, final, sampled)

    token_ids = torch.full((rows, width + 1), -1, dtype=torch.int64, device=device)
    token_ids[:, :width] = torch.where(leading, drafts, -1)
    token_ids[arange, num_accepted] = final
    return VerifyOutput(token_ids, num_accepted + 1)
