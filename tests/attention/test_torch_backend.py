"""The torch reference attention backend against a naive per-sequence implementation over contiguous K/V:
decodes (from the persistent decode buffer) and prefill chunks with cached prefixes (from the paged cache),
GQA, sliding windows, attention sinks, float32 and bfloat16; and the decode buffer's row bookkeeping."""

from __future__ import annotations

import random

import pytest
import torch

from microscale.attention.decode_buffer import DecodeBuffer
from microscale.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from microscale.attention.torch_backend import TorchAttentionBackend

BLOCK = 4


def naive_attention(q, keys, values, q_positions, scale, window, sinks=None):
    """q: [t, H, d] at absolute positions q_positions; keys/values: [L, KVH, d] for positions 0..L-1; sinks:
    [H] extra logits that join each softmax and are dropped after it (as transformers' gpt-oss does)."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    keys = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    values = values.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("thd,lhd->htl", q.float(), keys) * scale
    k_pos = torch.arange(keys.shape[0])
    allowed = k_pos[None, :] <= q_positions[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_positions[:, None] - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    if sinks is not None:
        sink_column = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)
        probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.einsum("htl,lhd->thd", probs, values)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("source", ["buffer", "paged"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_matches_naive_attention(dtype, tol, heads, kv_heads, window, source, with_sinks):
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

    # The persistent decode buffer holds the decodes' cached contexts contiguously, one row each.
    cap = 40
    keys_buf = torch.zeros(1, 4, kv_heads, cap, dim, dtype=dtype)
    values_buf = torch.zeros(1, 4, kv_heads, cap, dim, dtype=dtype)
    for row in range(4):
        cached = layout[row][0]
        keys_buf[0, row, :, :cached] = full_k[row][:cached].transpose(0, 1)
        values_buf[0, row, :, :cached] = full_v[row][:cached].transpose(0, 1)
    decode = DecodeBatch(4, torch.tensor([30, 27, 3, 0]), 31)
    if source == "buffer":
        decode.keys, decode.values, decode.length = keys_buf, values_buf, cap
    else:
        width = max(len(t) for t in tables[:4])
        decode.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables[:4]])
    prefills, start = [], 4
    for i in (4, 5):
        cached, new = layout[i]
        prefills.append(PrefillChunk(start, new, cached, torch.tensor(tables[i])))
        start += new
    slots = [(i, p) for i, (cached, new) in enumerate(layout) for p in range(cached, cached + new)]
    meta = AttentionMetadata(
        slot_blocks=torch.tensor([tables[i][p // BLOCK] for i, p in slots]),
        slot_offsets=torch.tensor([p % BLOCK for _, p in slots]),
        decode=decode,
        prefills=prefills,
    )
    q = torch.randn(len(slots), heads, dim).to(dtype)
    k_new = torch.stack([full_k[i][p] for i, p in slots])
    v_new = torch.stack([full_v[i][p] for i, p in slots])

    # Sinks around the scores' magnitude, so they take a real share of the attention mass.
    sinks = torch.randn(heads) + 1.0 if with_sinks else None
    out = TorchAttentionBackend().forward(q, k_new, v_new, kv_cache, meta, scale, window, 0, sinks)

    row = 0
    for i, (cached, new) in enumerate(layout):
        positions = torch.arange(cached, cached + new)
        expected = naive_attention(q[row : row + new], full_k[i], full_v[i], positions, scale, window, sinks)
        got = out[row : row + new].view(new, heads, dim).float()
        assert (got - expected).abs().max().item() < tol, f"sequence {i}"
        row += new
    # The new keys and values landed in their paged slots, and the decodes' also in their buffer rows.
    for (i, p), k_row in zip(slots, k_new):
        assert torch.equal(kv_cache[0, tables[i][p // BLOCK], p % BLOCK], k_row)
        if i < 4 and source == "buffer":
            assert torch.equal(keys_buf[0, i, :, p], k_row)


class _Seq:
    def __init__(self, seq_id: int, computed: int, table: list[int]) -> None:
        self.seq_id, self.num_computed_tokens, self.block_table = seq_id, computed, table


def test_decode_buffer_rows_follow_the_paged_cache():
    torch.manual_seed(0)
    layers, kv_heads, dim, num_blocks = 2, 2, 4, 32
    kv_cache = torch.randn(layers, 2, num_blocks, BLOCK, kv_heads, dim)
    buf = DecodeBuffer(layers, 4, kv_heads, dim, max_len=64, dtype=torch.float32, device=torch.device("cpu"),
                       initial_len=8)

    def check(seqs):
        ordered = buf.assign(seqs, kv_cache, BLOCK)
        assert sorted(buf.row_of[s.seq_id] for s in ordered) == list(range(len(seqs)))  # dense rows
        for s in ordered:
            row, used = buf.row_of[s.seq_id], s.num_computed_tokens
            expected = kv_cache[:, 0, s.block_table].flatten(1, 2)[:, :used].transpose(1, 2)
            assert torch.equal(buf.k[:, row, :, :used], expected)
        return ordered

    a, b, c = _Seq(0, 5, [3, 7]), _Seq(1, 2, [1]), _Seq(2, 9, [4, 5, 6])
    check([a, b, c])
    # Next step: b left (finished); a and c advanced one token (written by the step, here by hand).
    for s in (a, c):
        row, pos = buf.row_of[s.seq_id], s.num_computed_tokens
        buf.k[:, row, :, pos] = kv_cache[:, 0, s.block_table[pos // BLOCK], pos % BLOCK]
        s.num_computed_tokens += 1
    rows_before = dict(buf.row_of)
    check([c, a])  # c moved down into b's free row only if it was beyond the two rows
    assert buf.row_of[a.seq_id] == rows_before[a.seq_id]
    # A long newcomer makes the buffer grow past its initial 8 tokens; a sequence that skipped is refilled.
    d = _Seq(3, 20, [8, 9, 10, 11, 12, 13])
    check([d, a])
    assert buf.capacity >= 21
