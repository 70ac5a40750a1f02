"""Attention whose result for a query depends only on that query and its sequence's keys: not on the other
sequences of the step, on whether the query is decoded or part of a prefill chunk, or on where the chunks were
cut. Used in deterministic mode (`deterministic=True`), with the batch-invariant linear layers
(kernels/batch_invariant.py).

How: a query's scores against its keys come from one matmul whose result per element does not depend on the
batch (query rows padded to a multiple of ROW_TILE, for CPU BLAS, which picks its kernel from the row count;
the number of keys does not change an element). The softmax's max is exact in any order. Every sum over keys is
cut into fixed blocks of KEY_BLOCK keys counted from position 0 — the weights' sum and weights @ values per
block, the same shapes in every batch — and the blocks are combined left to right by a cumulative sum. Masked
keys (past the query, before its sliding window, or padding to the batch's longest context) weigh exactly 0, so
the blocks they fill add exact zeros: a decode, a prefill chunk cut anywhere, and the same query beside any
other sequences give the same bits. Slower than the reference backend: meant for reproducibility, not speed."""

from __future__ import annotations

import math

import torch

from microscale.attention.backend import StatelessBackend
from microscale.attention.metadata import AttentionMetadata, PrefillChunk
from microscale.kernels.batch_invariant import ROW_TILE, pad_rows
from microscale.quant.kv_cache import KVCache

KEY_BLOCK = 64
_MAX_SCORES = 1 << 22  # float32 scores held at once (16 MiB)


class BatchInvariantAttentionBackend(StatelessBackend):
    """An AttentionBackend (attention/backend.py) that keeps no state: decodes read the paged blocks."""

    name = "batch-invariant"
    graph_safe = False  # CPU only

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        if device.type != "cpu":
            return "batch invariance is established for CPU BLAS only (cuBLAS picks GEMM kernels per batch size)"
        return None

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
        layer_index: int,
        sinks: torch.Tensor | None = None,  # [num_heads] float32 extra logit per head (gpt-oss)
    ) -> torch.Tensor:
        # Every query then reads its keys from the cache, as stored: new and cached keys alike.
        kv_cache.write(k, v, meta.slot_blocks, meta.slot_offsets)
        out = torch.empty_like(q)
        decode = meta.decode
        if decode is not None:
            n = decode.size
            keys, values = _contexts(kv_cache, decode.paged_block_tables(), decode.context_lens)
            out[:n] = _attend(q[:n, None], decode.positions[:, None], keys, values, scale, window, sinks)[:, 0]
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            keys, values = _chunk_context(kv_cache, chunk)
            positions = torch.arange(chunk.context_start, chunk.context_len, device=q.device)
            out[rows] = _attend(q[None, rows], positions[None], keys, values, scale, window, sinks)[0]
        return out.flatten(1)


def _chunk_context(kv_cache: KVCache, chunk: PrefillChunk) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([chunk.context_len], device=chunk.block_table.device)
    return _contexts(kv_cache, chunk.block_table[None], lengths)


def _contexts(
    kv_cache: KVCache, block_tables: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of each sequence, [n, kv_heads, L, head_dim] with L a multiple of KEY_BLOCK; slots past
    a sequence's length are zeros (a padded table points at blocks of other sequences, or at never-written
    memory: a NaN there times a zero weight would still be NaN)."""
    n = block_tables.shape[0]
    block_size = kv_cache.data.shape[2]
    if KEY_BLOCK % block_size == 0:  # pad the table (with block 0, masked below) rather than copy the keys
        block_tables = pad_rows(block_tables, KEY_BLOCK // block_size, dim=1)
    keys, values = kv_cache.read(block_tables.flatten())  # [n * blocks, block_size, kv_heads, dim]
    keys, values = (pad_rows(x.view(n, -1, *x.shape[2:]), KEY_BLOCK, dim=1) for x in (keys, values))
    valid = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths[:, None]
    valid = valid[:, :, None, None]
    return tuple(torch.where(valid, x, 0).transpose(1, 2).contiguous() for x in (keys, values))


def _attend(
    q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
    window: int | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    """q: [n, queries, heads, dim] at `positions` [n, queries]; keys/values: [n, kv_heads, L, dim] from
    _contexts. Returns [n, queries, heads, dim]. Query rows of a matmul (group * queries) are padded to a multiple
    of ROW_TILE (padded queries sit at position 0: finite, and cut off at the end), then taken in slices that
    bound the float32 scores held at once."""
    n, queries, heads, _ = q.shape
    group = heads // keys.shape[1]
    multiple = ROW_TILE // math.gcd(group, ROW_TILE)
    q, positions = pad_rows(q, multiple, dim=1), pad_rows(positions, multiple, dim=1)
    step = max(multiple, _MAX_SCORES // (n * heads * keys.shape[2]) // multiple * multiple)
    parts = [
        _attend_rows(q[:, start : start + step], positions[:, start : start + step], keys, values, scale, window,
                     sinks)
        for start in range(0, q.shape[1], step)
    ]
    return torch.cat(parts, dim=1)[:, :queries]


def _attend_rows(
    q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
    window: int | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax in two passes over fixed blocks: the max over every allowed key (exact, in any order), then each
    block's sum of weights (KEY_BLOCK terms) and its weights @ values, combined over blocks left to right by a
    cumulative sum. The query heads of one KV head sit side by side (rows ordered (head in group, query))."""
    n, padded, heads, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group, blocks, rows = heads // kv_heads, length // KEY_BLOCK, heads // kv_heads * padded
    grouped = q.permute(0, 2, 1, 3).reshape(n, kv_heads, rows, dim)
    query_pos = positions.repeat(1, group)[:, None, :, None]  # [n, 1, rows, 1]
    key_pos = torch.arange(length, device=q.device)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale  # [n, kv_heads, rows, L]
    scores = torch.where(allowed, scores, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)  # every row allows the key at its own position: finite
    if sinks is not None:  # the sink is one more logit in the softmax
        sink = sinks.float().view(1, kv_heads, group, 1).expand(n, -1, -1, padded).reshape(n, kv_heads, rows, 1)
        top = torch.maximum(top, sink)
    weights = (scores - top).exp()
    # Masked keys weigh exactly 0, so blocks past a context add exact zeros: the sums do not see the padding.
    total = weights.view(n, kv_heads, rows, blocks, KEY_BLOCK).sum(dim=-1).cumsum(dim=-1)[..., -1:]
    if sinks is not None:
        total = total + (sink - top).exp()
    per_block = torch.matmul(weights.to(q.dtype).view(n, kv_heads, rows, blocks, KEY_BLOCK).transpose(2, 3),
                             values.view(n, kv_heads, blocks, KEY_BLOCK, dim))  # [n, kv_heads, blocks, rows, dim]
    out = per_block.float().cumsum(dim=2)[:, :, -1] / total
    return out.to(q.dtype).view(n, heads, padded, dim).transpose(1, 2)
