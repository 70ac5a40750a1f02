"""Persistent decode batch: the keys and values of the sequences that decode, kept contiguous per row.

Reading a sequence's context from the paged cache means gathering its blocks every step and every layer,
and attending over the gathered, strided copy; on a CPU that gather and the strided matmuls cost more than
the attention itself. Here each decoding sequence owns a row holding its whole context contiguously: it is
filled from the paged cache once, when the sequence starts decoding, then grows by one token per step.
Rows are kept dense (rows 0..n-1 are this step's decodes), so a step's keys are a plain slice of the buffer.
The paged cache stays the source of truth (prefix caching, preemption); a row is dropped whenever its
sequence skips a step and is refilled when it comes back. Rows are in the model dtype whatever the paged cache
stores: a quantised cache is dequantised when a row is filled, and each new token is written as the cache
holds it (what `KVCache.write` returns), so a row equals what the paged cache gives back.
"""

from __future__ import annotations

import torch

from microscale.attention.metadata import DecodeSequences
from microscale.quant.kv_cache import KVCache

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

    def assign(self, decodes: DecodeSequences, kv_caches: list[KVCache], block_size: int) -> list[int]:
        """Give every decoding sequence a row in 0..n-1 holding its cached tokens; returns each one's row, in
        the order given. `kv_caches`: the paged cache of each layer, in layer order."""
        cached = dict(zip(decodes.ids, decodes.num_cached))
        kept = {sid: row for sid, row in self.row_of.items() if sid in cached and self.length[sid] == cached[sid]}
        self.row_of = {}
        self.length = {sid: self.length[sid] for sid in kept}
        n = len(decodes.ids)
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
        needed = max(decodes.num_cached, default=0) + 1
        if needed > self.capacity:
            # Grown in small steps, so that attention over whole rows wastes little on empty positions.
            self._allocate(min(-(-needed // _GROWTH) * _GROWTH, self.max_len))
        for sid, used, table in zip(decodes.ids, decodes.num_cached, decodes.block_tables):
            if sid not in self.row_of:
                row = free_low.pop(0)
                self._fill(row, used, table, kv_caches, block_size)
                self.row_of[sid] = row
            self.length[sid] = used + 1  # after this step's token is written
        return [self.row_of[sid] for sid in decodes.ids]

    def _fill(self, row: int, used: int, table: list[int], kv_caches: list[KVCache], block_size: int) -> None:
        """Copy a sequence's `used` cached tokens from the paged cache into its row, dequantised to the buffer's
        dtype."""
        if used == 0:
            return
        blocks = torch.tensor(table[: -(-used // block_size)], device=self.device)
        for layer, cache in enumerate(kv_caches):
            # [n_blocks, block_size, kv_heads, dim] -> [kv_heads, tokens, dim]
            keys, values = cache.read(blocks)
            self.k[layer, row, :, :used] = keys.flatten(0, 1)[:used].transpose(0, 1)
            self.v[layer, row, :, :used] = values.flatten(0, 1)[:used].transpose(0, 1)

    def drop_rows(self) -> None:
        """Forget every row (e.g. the cache's values changed): each is refilled when its sequence next decodes."""
        self.row_of, self.length = {}, {}
