"""Attention metadata: built once per step by the model runner, read by every attention layer."""

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
class AttentionMetadata:
    """The flat batch holds the decode tokens first (one per sequence), then the prefill chunks."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor  # [num_decodes] keys per decode (its own token included)
    prefills: list[PrefillChunk]
    block_size: int
    # Masks depend only on the step, not the layer: build each window's mask once and share it.
    _decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[num_decodes, 1, 1, max_blocks * block_size] True where a key may be attended to."""
        mask = self._decode_masks.get(window)
        if mask is None:
            max_len = self.decode_block_tables.shape[1] * self.block_size
            key_pos = torch.arange(max_len, device=self.decode_context_lens.device)
            lens = self.decode_context_lens[:, None]
            mask = key_pos[None, :] < lens
            if window is not None:
                mask &= key_pos[None, :] >= lens - window
            mask = mask[:, None, None, :]
            self._decode_masks[window] = mask
        return mask
