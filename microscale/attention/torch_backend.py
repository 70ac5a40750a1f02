"""Reference attention over the paged KV cache, in plain torch. Runs on CPU and GPU; faster backends
(Triton) must match it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from microscale.attention.metadata import AttentionMetadata, PrefillChunk


class TorchAttentionBackend:
    name = "torch"

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        return None  # works everywhere

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, meta, scale, window)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale, window)
        return out.flatten(1)

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None) -> torch.Tensor:
        n, heads, dim = q.shape
        kv_heads = k_cache.shape[2]
        # Gather each sequence's blocks: [n, max_blocks * block_size, kv_heads, dim] -> [n, kv_heads, L, dim]
        keys = k_cache[meta.decode_block_tables].view(n, -1, kv_heads, dim).transpose(1, 2)
        values = v_cache[meta.decode_block_tables].view(n, -1, kv_heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.view(n, heads, 1, dim), keys, values, attn_mask=meta.decode_mask(window), scale=scale,
            enable_gqa=heads != kv_heads,
        )
        return out.view(n, heads, dim)

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float, window: int | None) -> torch.Tensor:
        heads, kv_heads = q.shape[1], k.shape[1]
        gqa = heads != kv_heads
        qt = q.transpose(0, 1)
        if chunk.context_start == 0 and window is None:
            # Nothing cached before this chunk: attend to the new keys directly, plain causal.
            out = F.scaled_dot_product_attention(
                qt, k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=gqa
            )
            return out.transpose(0, 1)
        length = chunk.context_len
        keys = k_cache[chunk.block_table].flatten(0, 1)[:length].transpose(0, 1)
        values = v_cache[chunk.block_table].flatten(0, 1)[:length].transpose(0, 1)
        q_pos = torch.arange(chunk.context_start, length, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(0, 1)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter the new tokens' keys and values into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)
