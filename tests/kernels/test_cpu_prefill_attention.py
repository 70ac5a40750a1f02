"""The AMX prefill attention kernel (kernels/cpu/prefill_attention.c, built with the machine's compiler) against
float64 causal attention over the sequence's keys in the paged cache: chunks fresh and after cached tokens, of
lengths around the kernel's 16-query tiles and 32-key steps, GQA groups, head sizes 32 to 256, sliding windows
narrower than a step (queries that see no key of a step), attention sinks; the bits do not depend on the
threads; when it applies; bad operands are refused. Skipped on a CPU without AMX-BF16."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels.cpu_attention import LONG_CHUNK_HEAD_DIM, LONG_CHUNK_QUERIES, CpuAttention

BLOCK = 16
_probe = torch.zeros(1, BLOCK, 1, 32, dtype=torch.bfloat16)
pytestmark = pytest.mark.skipif(not CpuAttention([(_probe, _probe)]).amx_prefill,
                                reason="no AMX-BF16 (or no C compiler) here")


def reference(q, keys, values, context_start, scale, window, sinks) -> torch.Tensor:
    """float64 attention of q [queries, heads, dim] at positions context_start.. over keys/values [L, kv_heads,
    dim]: causal, within the last `window` keys, with a sink logit per head."""
    queries, heads, _ = q.shape
    group = heads // keys.shape[1]
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    query_pos = torch.arange(context_start, context_start + queries)[:, None]
    key_pos = torch.arange(keys.shape[0])[None]
    seen = key_pos <= query_pos
    if window:
        seen &= key_pos > query_pos - window
    scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double()[:, None, None].expand(heads, queries, 1)], dim=-1)
    probs = scores.softmax(-1)[..., : keys.shape[0]]
    return torch.einsum("hqk,khd->qhd", probs, v)


def make_chunk(heads, kv_heads, dim, context_start, queries, seed=0):
    """bfloat16 caches of random contents (NaN in every slot the sequence does not own: never to be read), the
    sequence's shuffled block table, and its chunk's queries."""
    gen = torch.Generator().manual_seed(seed)
    length = context_start + queries
    owned = -(-length // BLOCK)
    num_blocks = owned + 3
    k_cache = torch.full((num_blocks, BLOCK, kv_heads, dim), float("nan"), dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    table = torch.randperm(num_blocks, generator=gen)[:owned]
    keys = torch.randn(length, kv_heads, dim, generator=gen).to(torch.bfloat16)
    values = torch.randn(length, kv_heads, dim, generator=gen).to(torch.bfloat16)
    slots = torch.arange(length)
    k_cache[table[slots // BLOCK], slots % BLOCK] = keys
    v_cache[table[slots // BLOCK], slots % BLOCK] = values
    q = (2 * torch.randn(queries, heads, dim, generator=gen)).to(torch.bfloat16)
    return q, k_cache, v_cache, table, keys, values


def prefill(q, k_cache, v_cache, table, context_start, scale, window, sinks) -> torch.Tensor:
    out = torch.zeros_like(q)
    CpuAttention([(k_cache, v_cache)]).prefill(0, q, out, table, context_start, scale, window, sinks)
    return out


def close_to(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within bfloat16 rounding of the probabilities and of the result (a relative 2^-8 each)."""
    return bool(((out.double() - expected).abs() <= 2**-7 * (1 + expected.abs())).all())


@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 32), (9, 3, 64), (4, 4, 128), (16, 2, 256)])
@pytest.mark.parametrize("context_start,queries", [(0, 1), (0, 5), (0, 33), (0, 100), (37, 50), (300, 17)])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (None, True), (7, False), (40, True)])
def test_matches_float64_causal_attention_over_the_paged_cache(heads, kv_heads, dim, context_start, queries,
                                                               window, with_sinks):
    q, k_cache, v_cache, table, keys, values = make_chunk(heads, kv_heads, dim, context_start, queries)
    sinks = torch.randn(heads) + 1.0 if with_sinks else None
    out = prefill(q, k_cache, v_cache, table, context_start, dim**-0.5, window, sinks)
    assert close_to(out, reference(q, keys, values, context_start, dim**-0.5, window, sinks))


def test_scores_far_apart_and_a_query_row_split_across_threads_give_the_same_bits() -> None:
    """Scores that jump by far more than the running maximum's slack (their sums rescaled mid-row), in a chunk
    long enough to share between two threads: the same bits from one thread as from two, and float64's result."""
    q, k_cache, v_cache, table, keys, values = make_chunk(6, 2, 64, 40, 200, seed=1)
    q[:, :, 0] = torch.linspace(1, 60, q.shape[0]).to(torch.bfloat16)[:, None]
    slots = torch.arange(0, keys.shape[0], 7)
    keys[slots, :, 0] = 4.0  # every 7th key scores up to 30 above the rest
    k_cache[table[slots // BLOCK], slots % BLOCK] = keys[slots]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefill(q, k_cache, v_cache, table, 40, 0.125, None, None)
        torch.set_num_threads(2)
        two = prefill(q, k_cache, v_cache, table, 40, 0.125, None, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert close_to(two, reference(q, keys, values, 40, 0.125, None, None))


def test_it_applies_to_chunks_after_cached_tokens_and_to_fresh_ones_unless_long_with_large_heads() -> None:
    small = torch.zeros(1, BLOCK, 1, 64, dtype=torch.bfloat16)
    large = torch.zeros(1, BLOCK, 1, LONG_CHUNK_HEAD_DIM, dtype=torch.bfloat16)
    assert CpuAttention([(small, small)]).prefill_applies(0, 4 * LONG_CHUNK_QUERIES)
    kernel = CpuAttention([(large, large)])
    assert kernel.prefill_applies(0, LONG_CHUNK_QUERIES) and kernel.prefill_applies(5, 2 * LONG_CHUNK_QUERIES)
    assert not kernel.prefill_applies(0, LONG_CHUNK_QUERIES + 1)
    assert not CpuAttention([(large, large)], amx=False).prefill_applies(5, 10)
    assert not CpuAttention([(large.float(), large.float())]).amx_prefill  # float32 caches: torch's SDPA


def test_bad_operands_are_refused() -> None:
    q, k_cache, v_cache, table, _, _ = make_chunk(4, 2, 32, 10, 20)
    kernel = CpuAttention([(k_cache, v_cache)])
    out = torch.zeros_like(q)
    with pytest.raises(ValueError, match="block_table cover"):
        kernel.prefill(0, q, out, table[:1], 10, 0.2, None, None)
    with pytest.raises(ValueError, match="out must hold"):
        kernel.prefill(0, q, out[:3], table, 10, 0.2, None, None)
    with pytest.raises(ValueError, match="int64"):
        kernel.prefill(0, q, out, table.int(), 10, 0.2, None, None)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        kernel.prefill(0, q[:, :3], out[:, :3], table, 10, 0.2, None, None)
    with pytest.raises(ValueError, match="sinks must be float32"):
        kernel.prefill(0, q, out, table, 10, 0.2, None, torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        kernel.prefill(0, q.float(), out, table, 10, 0.2, None, None)
    with pytest.raises(RuntimeError, match="needs bfloat16 caches"):
        CpuAttention([(k_cache.float(), v_cache.float())]).prefill(0, q.float(), out.float(), table, 10, 0.2,
                                                                   None, None)
