"""Attention metadata: built once per step by the model runner, read by every attention layer. (Each layer's
paged KV cache, its layout and storage dtype: microscale/quant/kv_cache.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence


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
class DecodeSequences:
    """The decoding sequences as host data, for a backend that keeps state per sequence (the torch backend's
    decode buffer, attention/decode_buffer.py)."""

    ids: list[int]
    num_cached: list[int]  # tokens each has in the KV cache before this step (its new token's position)
    block_tables: list[list[int]]  # each one's block table (unpadded)


@dataclass
class DecodeBatch:
    """This step's single-token queries; the new token of query i goes to position positions[i]. Their
    contexts are read from the paged cache through block_tables (or from a copy the backend keeps)."""

    size: int
    positions: torch.Tensor  # [size] int64
    length: int  # keys to attend over: the longest context (new token included)
    sequences: DecodeSequences | None = None
    # [size, max_blocks] int64, padded with 0: built from `sequences` on first use when not given.
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None  # [size] keys per sequence (positions + 1)
    # Split-K partitions for decode kernels; None: chosen from `length` (CUDA graphs fix it at capture).
    num_splits: int | None = None
    # Masks depend only on the step, not the layer: build each window's mask once and share it.
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def paged_block_tables(self) -> torch.Tensor:
        """block_tables, padded from the sequences' host tables on first use and shared by every layer (a
        backend that reads a copy of the contexts never pays for it)."""
        if self.block_tables is None:
            tables = self.sequences.block_tables
            width = max(len(table) for table in tables)
            padded = [table + [0] * (width - len(table)) for table in tables]
            self.block_tables = torch.tensor(padded, dtype=torch.int64, device=self.positions.device)
        return self.block_tables

    def mask(self, window: int | None) -> torch.Tensor:
        """[size, 1, 1, length] True where a key may be attended to."""
        mask = self._masks.get(window)
        if mask is None:
            key_pos = torch.arange(self.length, device=self.positions.device)
            mask = key_pos[None, :] <= self.positions[:, None]
            if window is not None:
                mask &= key_pos[None, :] > self.positions[:, None] - window
            mask = mask[:, None, None, :]
            self._masks[window] = mask
        return mask


@dataclass
class PrefillBatch:
    """Every prefill chunk of the step as tensors, for kernels that take them all in one launch. Query
    offsets count from the first prefill token."""

    block_tables: torch.Tensor  # [chunks, max_blocks] int64, padded with 0
    query_starts: torch.Tensor  # [chunks + 1]
    context_starts: torch.Tensor  # [chunks]
    max_query_len: int


@dataclass
class AttentionMetadata:
    """The flat batch holds the decode tokens first (one per sequence), then the prefill chunks."""

    slot_blocks: torch.Tensor  # [num_tokens] cache block of each new token
    slot_offsets: torch.Tensor  # [num_tokens] its position inside the block
    decode: DecodeBatch | None
    prefills: list[PrefillChunk]
    _prefill_batch: PrefillBatch | None = field(default=None, repr=False)

    def prefill_batch(self) -> PrefillBatch:
        """Built on first use and shared by every layer."""
        if self._prefill_batch is None:
            device = self.slot_blocks.device
            first = self.prefills[0].query_start
            tables = pad_sequence([c.block_table for c in self.prefills], batch_first=True)  # padded with 0
            last = self.prefills[-1]
            starts = [c.query_start - first for c in self.prefills] + [last.query_start - first + last.query_len]
            self._prefill_batch = PrefillBatch(
                tables, torch.tensor(starts, device=device),
                torch.tensor([c.context_start for c in self.prefills], device=device),
                max(c.query_len for c in self.prefills),
            )
        return self._prefill_batch
