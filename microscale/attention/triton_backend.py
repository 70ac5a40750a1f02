"""Attention over the paged KV cache with Triton kernels: the new keys/values are scattered (and quantised)
into their slots, then decodes (split-K over the block table) and prefill chunks (varlen, one launch) read
the cache in place, dequantising on the fly. Must match the torch reference backend."""

from __future__ import annotations

import torch

from microscale.attention.backend import StatelessBackend
from microscale.attention.metadata import AttentionMetadata
from microscale.kernels.decode_attention import choose_num_splits, paged_decode_attention
from microscale.kernels.kv_cache_write import write_kv_cache
from microscale.kernels.prefill_attention import paged_prefill_attention
from microscale.kernels.selector import triton_unavailable_reason
from microscale.quant.kv_cache import KVCache


class TritonAttentionBackend(StatelessBackend):
    name = "triton"
    # Decodes read paged blocks in place: no per-sequence state, nothing to prepare per step.
    graph_safe = True

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        return triton_unavailable_reason(device)

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
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cache = kv_cache.kernel_operands()
        write_kv_cache(k, v, cache.keys, cache.values, meta.slot_blocks, meta.slot_offsets, cache.k_scale,
                       cache.v_scale, cache.dynamic, cache.k_zero, cache.v_zero)
        reads = dict(scale=scale, window=window, sinks=sinks, k_scale=cache.k_scale, v_scale=cache.v_scale,
                     k_zero=cache.k_zero, v_zero=cache.v_zero)
        # Each kernel returns its rows; a decode-only (or prefill-only) step needs no copy into a joint output.
        parts = []
        decoded = 0
        if meta.decode is not None:
            batch = meta.decode
            decoded = batch.size
            # From the host-side longest context: the kernel would otherwise read context_lens back (a sync).
            splits = batch.num_splits or choose_num_splits(batch.length, decoded, k.shape[1], window)
            parts.append(paged_decode_attention(
                q[:decoded], cache.keys, cache.values, batch.paged_block_tables(), batch.context_lens,
                num_splits=splits, **reads,
            ))
        if meta.prefills:
            chunks = meta.prefill_batch()
            parts.append(paged_prefill_attention(
                q[decoded:], cache.keys, cache.values, chunks.block_tables, chunks.query_starts, chunks.context_starts,
                chunks.max_query_len, **reads,
            ))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.flatten(1)
