"""Persistent decode batch: the keys and values of the sequences that decode, kept contiguous per row.

Reading a sequence's context from the paged cache means gathering its blocks every step and every layer,
and attending over the gathered, strided copy; on a CPU that gather and the strided matmuls cost more than
the attention itself. Here each decoding sequence owns a row holding its whole context contiguously: it is
filled from the paged cache once, when the sequence starts decoding, then grows by one token per step.
Rows are kept dense (rows 0..n-1 are this step's decodes), so a step's keys are a plain slice of the buffer.
The paged cache stays the source of truth (prefix caching, preemption); a row is dropped whenever its
sequence skips a step and is refilled when it comes back.
"""

from __future__ import annotations

import torch

from microscale.engine.sequence import Sequence

_GROWTH = 64  # tokens


class DecodeBuffer:
    def __init__(
        self, num_layers: int, max_rows: int, kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype, device: torch.device, initial_len: int = 256,
    ) -> None:
        self.max_len = max_len
        self.shape = (num_layers, max_rows, kv_heads)
        self.head_dim = head_dim
        self.dtype, self.device = dtype, device
        self.k = self.v = torch.empty(0)
        self._allocate(min(initial_len, max_len))
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self.length: dict[int, int] = {}  # seq_id -> tokens its row holds

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def _allocate(self, capacity: int) -> None:
        old_k, old_v = self.k, self.v
        shape = (*self.shape, capacity, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if old_k.numel():
            kept = old_k.shape[3]
            self.k[..., :kept, :] = old_k
            self.v[..., :kept, :] = old_v

    def assign(self, decodes: list[Sequence], kv_cache: torch.Tensor, block_size: int) -> list[Sequence]:
        """Give every decoding sequence a row in 0..n-1 holding its cached tokens; returns the sequences in
        row order. `kv_cache`: [layers, 2, blocks, block_size, kv_heads, head_dim]."""
        wanted = {s.seq_id: s for s in decodes}
        kept = {sid: row for sid, row in self.row_of.items()
                if sid in wanted and self.length[sid] == wanted[sid].num_computed_tokens}
        self.row_of = {}
        self.length = {sid: self.length[sid] for sid in kept}
        n = len(decodes)
        # Keep rows dense: a kept row beyond the first n moves into a free row below n.
        free_low = sorted(set(range(n)) - set(kept.values()))
        for sid, row in sorted(kept.items(), key=lambda item: item[1]):
            if row >= n:
                new_row = free_low.pop(0)
                used = self.length[sid]
                self.k[:, new_row, :, :used] = self.k[:, row, :, :used]
                self.v[:, new_row, :, :used] = self.v[:, row, :, :used]
                row = new_row
            self.row_of[sid] = row
        needed = max((s.num_computed_tokens for s in decodes), default=0) + 1
        if needed > self.capacity:
            # Grown in small steps, so that attention over whole rows wastes little on empty positions.
            self._allocate(min(-(-needed // _GROWTH) * _GROWTH, self.max_len))
        for seq in decodes:
            if seq.seq_id not in self.row_of:
                row = free_low.pop(0)
                self._fill(row, seq, kv_cache, block_size)
                self.row_of[seq.seq_id] = row
            self.length[seq.seq_id] = seq.num_computed_tokens + 1  # after this step's token is written
        return sorted(decodes, key=lambda s: self.row_of[s.seq_id])

    def _fill(self, row: int, seq: Sequence, kv_cache: torch.Tensor, block_size: int) -> None:
        """Copy a sequence's cached tokens from the paged cache into its row (all layers at once)."""
        used = seq.num_computed_tokens
        if used == 0:
            return
        blocks = torch.tensor(seq.block_table[: -(-used // block_size)], device=kv_cache.device)
        # [layers, 2, n_blocks, block_size, kv_heads, dim] -> [layers, 2, kv_heads, tokens, dim]
        context = kv_cache.index_select(2, blocks).flatten(2, 3)[:, :, :used].transpose(2, 3)
        self.k[:, row, :, :used] = context[:, 0]
        self.v[:, row, :, :used] = context[:, 1]
