"""The torch reference attention backend against a naive per-sequence implementation over contiguous K/V:
mixed decodes (several length groups) and prefill chunks with cached prefixes, GQA, sliding windows,
float32 and bfloat16."""

from __future__ import annotations

import random

import pytest
import torch

from microscale.attention.metadata import AttentionMetadata, DecodeGroup, PrefillChunk
from microscale.attention.torch_backend import TorchAttentionBackend

BLOCK = 4


def naive_attention(q, keys, values, q_positions, scale, window):
    """q: [t, H, d] at absolute positions q_positions; keys/values: [L, KVH, d] for positions 0..L-1."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    keys = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    values = values.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), keys) * scale
    k_pos = torch.arange(keys.shape[0])
    allowed = k_pos[None, :] <= q_positions[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_positions[:, None] - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), values)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_matches_naive_attention(dtype, tol, heads, kv_heads, window):
    rng = random.Random(0)
    torch.manual_seed(0)
    dim, num_blocks = 16, 64
    scale = dim**-0.5
    kv_cache = torch.zeros(2, num_blocks, BLOCK, kv_heads, dim, dtype=dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (tokens already cached, new tokens this step): decodes in two length groups, then prefill chunks.
    layout = [(30, 1), (27, 1), (3, 1), (0, 1), (0, 6), (9, 5)]
    full_k, full_v, tables = [], [], []
    for cached, new in layout:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        keys = torch.randn(total, kv_heads, dim).to(dtype)
        values = torch.randn(total, kv_heads, dim).to(dtype)
        for p in range(cached):  # what earlier steps wrote
            kv_cache[0, table[p // BLOCK], p % BLOCK] = keys[p]
            kv_cache[1, table[p // BLOCK], p % BLOCK] = values[p]
        full_k.append(keys)
        full_v.append(values)
        tables.append(table)

    def table_tensor(rows):
        width = max(len(tables[i]) for i in rows)
        return torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in rows])

    groups = [
        DecodeGroup(0, 2, table_tensor([0, 1]), torch.tensor([31, 28]), BLOCK),
        DecodeGroup(2, 2, table_tensor([2, 3]), torch.tensor([4, 1]), BLOCK),
    ]
    prefills, start = [], 4
    for i in (4, 5):
        cached, new = layout[i]
        prefills.append(PrefillChunk(start, new, cached, torch.tensor(tables[i])))
        start += new
    slots = [(i, p) for i, (cached, new) in enumerate(layout) for p in range(cached, cached + new)]
    meta = AttentionMetadata(
        slot_blocks=torch.tensor([tables[i][p // BLOCK] for i, p in slots]),
        slot_offsets=torch.tensor([p % BLOCK for _, p in slots]),
        decode_groups=groups,
        prefills=prefills,
    )
    q = torch.randn(len(slots), heads, dim).to(dtype)
    k_new = torch.stack([full_k[i][p] for i, p in slots])
    v_new = torch.stack([full_v[i][p] for i, p in slots])

    out = TorchAttentionBackend().forward(q, k_new, v_new, kv_cache, meta, scale, window)

    row = 0
    for i, (cached, new) in enumerate(layout):
        positions = torch.arange(cached, cached + new)
        expected = naive_attention(q[row : row + new], full_k[i], full_v[i], positions, scale, window)
        got = out[row : row + new].view(new, heads, dim).float()
        assert (got - expected).abs().max().item() < tol, f"sequence {i}"
        row += new
    # The new keys and values landed in their slots.
    for (i, p), k_row in zip(slots, k_new):
        assert torch.equal(kv_cache[0, tables[i][p // BLOCK], p % BLOCK], k_row)
