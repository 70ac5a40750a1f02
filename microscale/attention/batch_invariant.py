"""Attention whose result for a query depends only on that query and its sequence's keys: not on the other
sequences of the step, on whether the query is decoded or part of a prefill chunk, or on where the chunks were
cut. Used in deterministic mode (`deterministic=True`), with the batch-invariant linear layers
(kernels/batch_invariant.py).

How: every query attends over its context in fixed key blocks of KEY_BLOCK tokens counted from position 0,
with an online softmax (flash attention's running max and sum, in float32). Each block is two matmuls whose
shapes do not depend on the batch: KEY_BLOCK keys, head_dim, and query rows padded to a multiple of ROW_TILE
(for CPU BLAS, which picks its kernel from the row count). A block that is wholly masked for a query (past its
position, or before its sliding window) leaves its running values exactly as they were (a factor exp(0) = 1
and a sum of zeros), so padding a decode to the batch's longest context changes nothing. Slower than the
reference backend: meant for reproducibility, not speed."""

from __future__ import annotations

import math

import torch

from microscale.attention.metadata import AttentionMetadata, PrefillChunk
from microscale.kernels.batch_invariant import ROW_TILE, pad_rows
from microscale.quant.kv_cache import KVCache

KEY_BLOCK = 64


class BatchInvariantAttentionBackend:
    """An AttentionBackend (attention/backend.py) that keeps no state: decodes read the paged blocks."""

    name = "batch-invariant"
    graph_safe = False  # CPU only

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        if device.type != "cpu":
            return "batch invariance is established for CPU BLAS only (cuBLAS picks GEMM kernels per batch size)"
        return None

    def bind_kv_caches(
        self, kv_caches: list[KVCache], num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int
    ) -> None:
        pass

    def kv_cache_changed(self) -> None:
        pass

    def prepare(self, meta: AttentionMetadata) -> None:
        pass

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
            keys, values = _contexts(kv_cache, decode.paged_block_tables(), decode.positions + 1)
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
    _contexts. Returns [n, queries, heads, dim]. The query heads of one KV head sit side by side (rows ordered
    (head in group, query)), as in the reference backend."""
    n, queries, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # Query rows of a matmul (group * queries) padded to a multiple of ROW_TILE; padded queries sit at
    # position 0 (finite) and are cut off at the end.
    multiple = ROW_TILE // math.gcd(group, ROW_TILE)
    q, positions = pad_rows(q, multiple, dim=1), pad_rows(positions, multiple, dim=1)
    padded = q.shape[1]
    grouped = q.permute(0, 2, 1, 3).reshape(n, kv_heads, group * padded, dim)
    query_pos = positions.repeat(1, group)[:, None, :, None]  # [n, 1, rows, 1]
    rows = group * padded
    if sinks is None:
        # A finite floor, not -inf: a wholly masked block then gives exp(floor - floor) = 1, not NaN.
        top = torch.full((n, kv_heads, rows, 1), torch.finfo(torch.float32).min, device=q.device)
        total = torch.zeros_like(top)
    else:  # the sink is one more logit in the softmax: start the running max and sum with it
        sink = sinks.float().view(1, kv_heads, group, 1).expand(n, -1, -1, padded)
        top = sink.reshape(n, kv_heads, rows, 1).clone()
        total = torch.ones_like(top)
    acc = torch.zeros(n, kv_heads, rows, dim, dtype=torch.float32, device=q.device)
    for start in range(0, keys.shape[2], KEY_BLOCK):
        block = slice(start, start + KEY_BLOCK)
        key_pos = torch.arange(start, start + KEY_BLOCK, device=q.device)
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= key_pos > query_pos - window
        scores = torch.matmul(grouped, keys[:, :, block].transpose(-1, -2)).float() * scale
        scores = torch.where(allowed, scores, float("-inf"))
        new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
        decay = (top - new_top).exp()
        weights = (scores - new_top).exp()
        total = total * decay + weights.sum(dim=-1, keepdim=True)
        acc = acc * decay + torch.matmul(weights.to(q.dtype), values[:, :, block]).float()
        top = new_top
    out = (acc / total).to(q.dtype).view(n, heads, padded, dim).transpose(1, 2)
    return out[:, :queries]
