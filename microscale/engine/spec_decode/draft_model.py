"""Draft-model proposals (vLLM's method "draft"): a smaller model on the target's tokenizer, with its own paged KV
cache, runs up to k steps ahead of each speculating sequence.

Each sequence keeps, in the draft's cache, the KV of the tokens the draft has seen: the sequence's tokens, then
the drafts it fed itself last time. Before proposing, that list is cut back to where it still agrees with the
sequence (the target accepted some drafts, then emitted its own token), so only the tokens after that point are
fed again: one forward catches every sequence up (a prompt is a chunk; one new token a decode), then one decode
step per further draft. Draft tokens are sampled from the draft's distributions processed with each request's
sampling parameters (penalties, temperature, min_p, top-k, top-p), so rejection sampling keeps the target's
distribution exactly; a greedy request's drafts are the draft's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from microscale.engine.model_runner import ModelRunner, StepInputs
from microscale.engine.sampler import SamplingBatch, SamplingRow, constrain_logits, sample_from, sampling_probs
from microscale.engine.sequence import Sequence
from microscale.engine.spec_decode.proposer import Proposals


@dataclass
class _DraftState:
    """One sequence's share of the draft's KV cache."""

    block_table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the tokens whose KV the draft's cache holds, in order
    num_target_tokens: int = 0  # of those, the leading ones that were the sequence's own (not drafts)


class DraftModelProposer:
    def __init__(
        self, runner: ModelRunner, num_blocks: int, block_size: int, k: int, eos_ids: list[int], vocab_size: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.runner = runner
        self.block_size = block_size
        self.k = k
        self.eos_ids, self.vocab_size = eos_ids, vocab_size
        self.max_chunk = max_num_batched_tokens  # a catch-up forward holds no more tokens than a target step
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.states: dict[Sequence, _DraftState] = {}

    def release(self, seq: Sequence) -> None:
        """`seq` is finished: its blocks go back."""
        state = self.states.pop(seq, None)
        if state is not None:
            self.free_blocks.extend(reversed(state.block_table))

    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposals:
        """Up to limits[i] draft tokens after each sequence, with the distributions they were drawn from."""
        active, counts = [], []
        for i, (seq, limit) in enumerate(zip(seqs, limits, strict=True)):
            count = min(self.k, limit)
            # Room for the KV of its tokens and of the drafts fed back (the last draft is not).
            if count > 0 and self._reserve(seq, seq.num_tokens + count - 1):
                active.append(i)
                counts.append(count)
        proposals = Proposals([[] for _ in seqs])
        if not active:
            return proposals
        drafting = [seqs[i] for i in active]
        rows = [seq.sampling_row() for seq in drafting]
        drafts: list[list[int]] = [[] for _ in drafting]
        probs = None
        logits = self._catch_up(drafting)  # [len(drafting), V]: after each sequence's last token
        for j in range(max(counts)):
            going = [r for r, count in enumerate(counts) if count > j]  # the rows of `logits`, in order
            tokens, step_probs = self._sample(logits, [rows[r].after(drafts[r]) for r in going])
            if step_probs is not None:
                if probs is None:
                    probs = step_probs.new_zeros(len(seqs), self.k, self.vocab_size)
                probs[[active[r] for r in going], j] = step_probs
            for r, token in zip(going, tokens, strict=True):
                drafts[r].append(token)
            fed = [r for r in going if counts[r] > j + 1]  # next step's rows: their draft j is fed back
            if fed:
                logits = self._decode([drafting[r] for r in fed], [drafts[r][-1] for r in fed], j)
        for r, i in enumerate(active):
            proposals.token_ids[i] = drafts[r]
        proposals.probs = probs
        return proposals

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` of `seq` in the draft's cache; False (its state dropped) when the pool is out
        of blocks: it is then not proposed for this step."""
        state = self.states.setdefault(seq, _DraftState())
        needed = -(-num_tokens // self.block_size) - len(state.block_table)
        if needed > len(self.free_blocks):
            self.release(seq)
            return False
        for _ in range(needed):
            state.block_table.append(self.free_blocks.pop())
        return True

    def _catch_up(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's tokens the draft has not seen (at least its last one, whose logits are wanted);
        returns the logits after each sequence's last token. One forward unless the tokens exceed a step."""
        pieces = []  # (sequence index, first position, tokens)
        for i, seq in enumerate(seqs):
            state = self.states[seq]
            start = _agreeing_prefix(state, seq)
            del state.tokens[start:]
            state.tokens += seq.token_ids[start : seq.num_tokens]
            state.num_target_tokens = seq.num_tokens
            for first in range(start, seq.num_tokens, self.max_chunk):
                pieces.append((i, first, seq.token_ids[first : min(first + self.max_chunk, seq.num_tokens)]))
        last = {}
        batch: list[tuple[int, int, list[int]]] = []
        size = 0
        for piece in pieces + [None]:
            if batch and (piece is None or size + len(piece[2]) > self.max_chunk):
                logits = self._forward(seqs, batch)
                for (i, first, tokens), row in zip(batch, logits, strict=True):
                    if first + len(tokens) == seqs[i].num_tokens:
                        last[i] = row
                batch, size = [], 0
            if piece is not None:
                batch.append(piece)
                size += len(piece[2])
        return torch.stack([last[i] for i in range(len(seqs))])

    def _decode(self, seqs: list[Sequence], tokens: list[int], j: int) -> torch.Tensor:
        """Feed each sequence its draft j (at the position after its last token plus j); the logits after it."""
        pieces = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            self.states[seq].tokens.append(token)
            pieces.append((i, seq.num_tokens + j, [token]))
        return self._forward(seqs, pieces)

    def _forward(self, seqs: list[Sequence], pieces: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """One draft forward over `pieces` (sequence index, first position, tokens); the logits after each
        piece's last token, in order. Single tokens go as decodes (on a CPU they read the decode buffer)."""
        bs = self.block_size
        decodes = [p for p in pieces if len(p[2]) == 1]
        chunks = [p for p in pieces if len(p[2]) > 1]
        step = StepInputs(input_ids=[], positions=[], slots=[], num_decodes=len(decodes),
                          decode_seq_ids=[seqs[i].seq_id for i, _, _ in decodes],
                          decode_tables=[self.states[seqs[i]].block_table for i, _, _ in decodes], prefills=[],
                          rows=[])
        ends = {}
        for piece in decodes + chunks:
            i, first, tokens = piece
            table = self.states[seqs[i]].block_table
            if len(tokens) > 1:
                step.prefills.append((len(tokens), first, table))
            step.input_ids += tokens
            step.positions += range(first, first + len(tokens))
            step.slots += (table[p // bs] * bs + p % bs for p in range(first, first + len(tokens)))
            ends[id(piece)] = len(step.input_ids) - 1
        step.rows = [ends[id(piece)] for piece in pieces]
        return self.runner.forward_logits(step)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], torch.Tensor | None]:
        """One draft token per row, and the distributions the random rows' were drawn from (None: all greedy)."""
        batch = SamplingBatch.build(rows, self.eos_ids, self.vocab_size, logits.device)
        constrained = constrain_logits(logits, batch)
        tokens = constrained.argmax(dim=-1)
        if batch.all_greedy:
            return tokens.tolist(), None
        probs = sampling_probs(constrained, batch)
        tokens = torch.where(batch.temperature == 0, tokens, sample_from(probs, batch.seeded))
        return tokens.tolist(), probs


def _agreeing_prefix(state: _DraftState, seq: Sequence) -> int:
    """How many of the draft's tokens are still `seq`'s: its own tokens, then the drafts the target accepted;
    never all of `seq`'s tokens (the last one is fed again, for its logits)."""
    agree = min(state.num_target_tokens, seq.num_tokens)
    end = min(len(state.tokens), seq.num_tokens)
    while agree < end and state.tokens[agree] == seq.token_ids[agree]:
        agree += 1
    return min(agree, seq.num_tokens - 1)
