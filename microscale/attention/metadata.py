"""Attention metadata: built once per step by the model runner, read by every attention layer.

KV cache layout, per layer: [2 (key, value), num_blocks, block_size, num_kv_heads, head_dim]: a gather of
whole blocks from one half is contiguous, so the gathered keys view as one sequence without another copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillChunk:
    """One sequence's query chunk of more than one token. Its queries are tokens
    [context_start, context_start + query_len) of the sequence; keys span [0, context_start + query_len)."""

    query_start: int  # offset of the chunk in the flat token batch
    query_len: int
    context_start: int  # tokens of this sequence already in the KV cache before this step
    block_table: torch.Tensor  # [num_blocks] int64

    @property
    def context_len(self) -> int:
        return self.context_start + self.query_len


@dataclass
class DecodeGroup:
    """Single-token queries of sequences with similar context lengths, attended in one batched call.
    Grouping by length keeps the padding of the gathered keys small."""

    start: int  # rows [start, start + size) of the flat batch
    size: int
    block_tables: torch.Tensor  # [size, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [size] keys per query (its own token included)
    block_size: int
    # Masks depend only on the step, not the layer: build each window's mask once and share it.
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, window: int | None) -> torch.Tensor:
        """[size, 1, 1, max_blocks * block_size] True where a key may be attended to."""
        mask = self._masks.get(window)
        if mask is None:
            key_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=self.context_lens.device)
            lens = self.context_lens[:, None]
            mask = key_pos[None, :] < lens
            if window is not None:
                mask &= key_pos[None, :] >= lens - window
            mask = mask[:, None, None, :]
            self._masks[window] = mask
        return mask


@dataclass
class AttentionMetadata:
    """The flat batch holds the decode tokens first (one per sequence), then the prefill chunks."""

    slot_blocks: torch.Tensor  # [num_tokens] cache block of each new token
    slot_offsets: torch.Tensor  # [num_tokens] its position inside the block
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
