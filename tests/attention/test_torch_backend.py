"""The torch reference attention backend against a naive per-sequence implementation over contiguous K/V:
decodes (by the CPU kernel over the paged cache, from the persistent decode buffer, or from gathered paged
blocks) and prefill chunks with cached prefixes (from the paged cache),
GQA, sliding windows, attention sinks, float32 and bfloat16, KV caches in the model dtype, int8 and int4 (dynamic
and static scales) and fp8 (the naive reference attends over what the cache holds); and the decode buffer's row
bookkeeping."""

from __future__ import annotations

import random

import pytest
import torch

from microscale.attention.decode_buffer import DecodeBuffer
from microscale.attention.metadata import AttentionMetadata, DecodeBatch, DecodeSequences, PrefillChunk
from microscale.attention.torch_backend import TorchAttentionBackend
from microscale.quant.kv_cache import KVCache, kv_scales_from_amax, make_kv_cache

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


# "int8-static", "int4-static": per-head scales from the amax of the data (as calibration would set them).
KV_QUANTS = [None, "int8", "int8-static", "int4", "int4-static", "fp8"]


def make_cache(kv_quant: str | None, kv_heads: int, dim: int, dtype: torch.dtype, num_blocks: int,
               calibration: list[torch.Tensor]) -> KVCache:
    """An allocated cache; static scales come from the amax of `calibration` (keys and values, [L, kv_heads,
    dim] each)."""
    scheme = kv_quant.removesuffix("-static") if kv_quant else None
    cache = make_kv_cache(scheme, kv_heads, dim, dtype, torch.device("cpu"))
    if kv_quant in ("int8-static", "int4-static", "fp8"):
        amax = torch.cat(calibration).float().abs().amax(dim=(0, 2))
        cache.set_scales(*kv_scales_from_amax(scheme, amax, amax))
    cache.allocate(num_blocks, BLOCK)
    return cache


def held(cache: KVCache, table: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's keys and values [length, kv_heads, dim] as the cache holds them."""
    keys, values = cache.read(torch.tensor(table))
    return keys.flatten(0, 1)[:length], values.flatten(0, 1)[:length]


def write(cache: KVCache, table: list[int], k: torch.Tensor, v: torch.Tensor, positions: range) -> None:
    blocks = torch.tensor([table[p // BLOCK] for p in positions], dtype=torch.int64)
    cache.write(k, v, blocks, torch.tensor([p % BLOCK for p in positions], dtype=torch.int64))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("source,kv_quant",
                         [("kernel", None)] + [(s, q) for s in ("buffer", "paged") for q in KV_QUANTS])
def test_matches_naive_attention(dtype, tol, heads, kv_heads, window, source, with_sinks, kv_quant):
    rng = random.Random(0)
    torch.manual_seed(0)
    dim, num_blocks = 16, 64
    scale = dim**-0.5
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (tokens already cached, new tokens this step): decodes in two length groups, then prefill chunks.
    layout = [(30, 1), (27, 1), (3, 1), (0, 1), (0, 6), (9, 5)]
    full_k, full_v, tables = [], [], []
    for cached, new in layout:
        total = cached + new
        tables.append([free.pop() for _ in range(-(-total // BLOCK))])
        full_k.append(torch.randn(total, kv_heads, dim).to(dtype))
        full_v.append(torch.randn(total, kv_heads, dim).to(dtype))
    kv_cache = make_cache(kv_quant, kv_heads, dim, dtype, num_blocks, full_k + full_v)
    for i, (cached, _) in enumerate(layout):  # what earlier steps wrote
        write(kv_cache, tables[i], full_k[i][:cached], full_v[i][:cached], range(cached))

    decode = DecodeBatch(4, torch.tensor([30, 27, 3, 0]), 31,
                         sequences=DecodeSequences([0, 1, 2, 3], [30, 27, 3, 0], tables[:4]))
    backend = TorchAttentionBackend(cpu_kernel=source == "kernel")
    if source == "kernel":
        # The C kernel writes the step's keys and values and attends the decodes over the paged blocks in place.
        backend.bind_kv_caches([kv_cache], num_blocks, BLOCK, max_num_seqs=4, max_model_len=40)
        assert backend.cpu_attention is not None and backend.decode_buffer is None
    if source == "buffer":
        # The persistent decode buffer holds the decodes' cached contexts contiguously, one row each, as read
        # from the paged cache (rows 0..3, filled when the step is prepared).
        backend.bind_kv_caches([kv_cache], num_blocks, BLOCK, max_num_seqs=4, max_model_len=40)
        keys_buf, values_buf = backend.decode_buffer.k, backend.decode_buffer.v
    # "paged": unbound, decodes read the paged cache through the block tables padded from `sequences`
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
    backend.prepare(meta)
    out = backend.forward(q, k_new, v_new, kv_cache, meta, scale, window, 0, sinks)

    row = 0
    for i, (cached, new) in enumerate(layout):
        keys, values = held(kv_cache, tables[i], cached + new)
        if kv_quant is None:
            assert torch.equal(keys, full_k[i]) and torch.equal(values, full_v[i])
        else:  # the cache holds the keys and values, up to the quantisation error (fp8: 3 mantissa bits; int4:
            # half of one of 16 steps over a vector's range, or over [-amax, amax] when static)
            rtol, atol = (0.0, 0.3) if kv_quant.startswith("int4") else (0.07, 0.05)
            assert torch.allclose(keys.float(), full_k[i].float(), rtol=rtol, atol=atol)
            assert torch.allclose(values.float(), full_v[i].float(), rtol=rtol, atol=atol)
        positions = torch.arange(cached, cached + new)
        expected = naive_attention(q[row : row + new], keys, values, positions, scale, window, sinks)
        got = out[row : row + new].view(new, heads, dim).float()
        assert (got - expected).abs().max().item() < tol, f"sequence {i}"
        if i < 4 and source == "buffer":  # the decode's new key went into its buffer row as the cache holds it
            assert torch.equal(keys_buf[0, i, :, cached], keys[cached])
            assert torch.equal(values_buf[0, i, :, cached], values[cached])
        row += new


@pytest.mark.parametrize("kv_quant", KV_QUANTS)
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_prefill_matches_whole_prefill(kv_quant, window):
    """A prompt prefilled in one chunk (attending to its new keys directly) or in three (attending to the
    cache) sees the same keys and values: outputs agree to float32 rounding."""
    torch.manual_seed(0)
    heads, kv_heads, dim, length = 4, 2, 16, 23
    k, v = torch.randn(length, kv_heads, dim) * 3, torch.randn(length, kv_heads, dim)
    q = torch.randn(length, heads, dim)
    table = [5, 2, 9, 0, 7, 3]
    outputs = []
    for cuts in ([0, length], [0, 6, 15, length]):
        cache = make_cache(kv_quant, kv_heads, dim, torch.float32, 10, [k, v])
        parts = []
        for start, end in zip(cuts, cuts[1:]):
            span = range(start, end)
            meta = AttentionMetadata(
                slot_blocks=torch.tensor([table[p // BLOCK] for p in span]),
                slot_offsets=torch.tensor([p % BLOCK for p in span]),
                decode=None,
                prefills=[PrefillChunk(0, end - start, start, torch.tensor(table))],
            )
            parts.append(TorchAttentionBackend().forward(q[start:end], k[start:end], v[start:end], cache, meta,
                                                         dim**-0.5, window, 0))
        outputs.append(torch.cat(parts))
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-5


class _Seq:
    def __init__(self, seq_id: int, computed: int, table: list[int]) -> None:
        self.seq_id, self.num_computed_tokens, self.block_table = seq_id, computed, table


@pytest.mark.parametrize("kv_quant", [None, "int8"])
def test_decode_buffer_rows_follow_the_paged_cache(kv_quant):
    torch.manual_seed(0)
    layers, kv_heads, dim, num_blocks = 2, 2, 4, 32
    caches = [make_cache(kv_quant, kv_heads, dim, torch.float32, num_blocks, []) for _ in range(layers)]
    every_slot = torch.arange(num_blocks).repeat_interleave(BLOCK), torch.arange(BLOCK).repeat(num_blocks)
    for cache in caches:
        cache.write(torch.randn(num_blocks * BLOCK, kv_heads, dim), torch.randn(num_blocks * BLOCK, kv_heads, dim),
                    *every_slot)
    # [layers, blocks, block_size, kv_heads, dim]: the keys as the caches give them back.
    held_keys = torch.stack([cache.read(torch.arange(num_blocks))[0] for cache in caches])
    buf = DecodeBuffer(layers, 4, kv_heads, dim, max_len=64, dtype=torch.float32, device=torch.device("cpu"),
                       initial_len=8)

    def check(seqs):
        decodes = DecodeSequences([s.seq_id for s in seqs], [s.num_computed_tokens for s in seqs],
                                  [s.block_table for s in seqs])
        rows = buf.assign(decodes, caches, BLOCK)
        assert rows == [buf.row_of[s.seq_id] for s in seqs]
        ordered = sorted(seqs, key=lambda s: buf.row_of[s.seq_id])
        assert sorted(buf.row_of[s.seq_id] for s in ordered) == list(range(len(seqs)))  # dense rows
        for s in ordered:
            row, used = buf.row_of[s.seq_id], s.num_computed_tokens
            expected = held_keys[:, s.block_table].flatten(1, 2)[:, :used].transpose(1, 2)
            assert torch.equal(buf.k[:, row, :, :used], expected)
        return ordered

    a, b, c = _Seq(0, 5, [3, 7]), _Seq(1, 2, [1]), _Seq(2, 9, [4, 5, 6])
    check([a, b, c])
    # Next step: b left (finished); a and c advanced one token (written by the step, here by hand).
    for s in (a, c):
        row, pos = buf.row_of[s.seq_id], s.num_computed_tokens
        buf.k[:, row, :, pos] = held_keys[:, s.block_table[pos // BLOCK], pos % BLOCK]
        s.num_computed_tokens += 1
    rows_before = dict(buf.row_of)
    check([c, a])  # c moved down into b's free row only if it was beyond the two rows
    assert buf.row_of[a.seq_id] == rows_before[a.seq_id]
    # A long newcomer makes the buffer grow past its initial 8 tokens; a sequence that skipped is refilled.
    d = _Seq(3, 20, [8, 9, 10, 11, 12, 13])
    check([d, a])
    assert buf.capacity >= 21
    # Dropped rows (the cache's values changed) are all refilled.
    buf.drop_rows()
    check([a, d])
