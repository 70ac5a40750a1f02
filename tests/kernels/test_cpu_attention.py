"""The CPU attention kernel (kernels/cpu/decode_attention.c, built with the machine's compiler) against float64
attention over the sequences' own keys: the step's new keys and values land in their slots, decodes attend over
contexts that cross blocks in any order, GQA groups cut into the kernel's parts of four heads, head sizes 16 to
256, sliding windows, attention sinks, float32, bfloat16 and float16, contexts long enough to split between
threads; a sequence's bits do not depend on its batch or the threads; bad operands are refused."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels import cpu_amx
from microscale.kernels.cpu_attention import CpuAttention, cpu_attention_unavailable_reason

CPU = torch.device("cpu")
BLOCK = 16
pytestmark = pytest.mark.skipif(cpu_attention_unavailable_reason(CPU, torch.float32, 64) is not None,
                                reason=f"{cpu_attention_unavailable_reason(CPU, torch.float32, 64)}")


def reference(q, k_cache, v_cache, tables, positions, scale, window, sinks) -> torch.Tensor:
    """float64 attention of q[i] over keys 0..positions[i] of sequence i (its last `window`), with sinks."""
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    outs = []
    for i, pos in enumerate(positions.tolist()):
        keys = k_cache[tables[i]].flatten(0, 1)[: pos + 1].double()
        values = v_cache[tables[i]].flatten(0, 1)[: pos + 1].double()
        first = max(0, pos + 1 - window) if window else 0
        keys, values = keys[first:], values[first:]
        grouped = q[i].double().view(kv_heads, heads // kv_heads, -1)
        scores = torch.einsum("kgd,lkd->kgl", grouped, keys) * scale
        if sinks is not None:
            scores = torch.cat([scores, sinks.double().view(kv_heads, -1, 1)], dim=-1)
        probs = scores.softmax(-1)[..., : keys.shape[0]]
        outs.append(torch.einsum("kgl,lkd->kgd", probs, values).reshape(heads, -1))
    return torch.stack(outs)


def make_step(dtype, heads, kv_heads, dim, positions, extra_tokens=0, seed=0):
    """Caches with random contents, disjoint shuffled block tables, and the step's new keys/values (one per
    decode at its position, then `extra_tokens` more as a prefill would write)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(positions)
    width = max(positions) // BLOCK + 2
    num_blocks = n * width + 1
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: n * width].view(n, width)
    positions = torch.tensor(positions)
    slots = [(tables[i, p // BLOCK].item(), p % BLOCK) for i, p in enumerate(positions.tolist())]
    slots += [(tables[0, -1].item(), j) for j in range(extra_tokens)]  # a block nobody attends to yet
    slot_blocks, slot_offsets = (torch.tensor(column) for column in zip(*slots))
    tokens = len(slots)
    k_new = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    v_new = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    return q, k_new, v_new, k_cache, v_cache, tables, positions, slot_blocks, slot_offsets


def run(q, k_new, v_new, k_cache, v_cache, tables, positions, slot_blocks, slot_offsets, scale, window, sinks,
        amx=True):
    attention = CpuAttention([(k_cache, v_cache)], amx=amx)
    attention.set_step(slot_blocks, slot_offsets, tables, positions)
    out = torch.zeros_like(q)
    attention(0, q, k_new, v_new, out, scale, window, sinks)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 16), (9, 3, 64), (12, 2, 128), (8, 1, 256), (10, 2, 80)])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (None, True), (7, False), (40, True)])
def test_matches_float64_attention_and_writes_the_new_tokens(dtype, tol, heads, kv_heads, dim, window, with_sinks):
    positions = [0, 15, 16, 33, 140]  # block edges, and a context of nine blocks
    q, k_new, v_new, k_cache, v_cache, tables, pos, blocks, offsets = make_step(
        dtype, heads, kv_heads, dim, positions, extra_tokens=3)
    sinks = torch.randn(heads) + 1.0 if with_sinks else None
    out = run(q, k_new, v_new, k_cache, v_cache, tables, pos, blocks, offsets, dim**-0.5, window, sinks)
    assert torch.equal(k_cache[blocks, offsets], k_new) and torch.equal(v_cache[blocks, offsets], v_new)
    expected = reference(q[:5], k_cache, v_cache, tables, pos, dim**-0.5, window, sinks)
    assert (out[:5].double() - expected).abs().max().item() < tol
    assert not out[5:].any()  # rows past the decodes (prefill tokens) are the backend's to fill


def test_long_contexts_split_between_threads_give_the_same_bits_as_one_thread() -> None:
    positions = [2100, 5, 700]
    step = make_step(torch.bfloat16, 16, 2, 128, positions, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(*step, 128**-0.5, None, None)
        torch.set_num_threads(2)
        two = run(*step, 128**-0.5, None, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    q, _, _, k_cache, v_cache, tables, pos, _, _ = step
    expected = reference(q, k_cache, v_cache, tables, pos, 128**-0.5, None, None)
    assert (two.double() - expected).abs().max().item() < 2**-7


@pytest.mark.parametrize("heads,kv_heads,dim", [(20, 1, 32), (6, 2, 128)])
def test_bfloat16_scores_from_amx_tiles_match_float64_and_the_vector_path(heads, kv_heads, dim) -> None:
    """A group of 20 heads takes two parts (16 + 4); windows start runs mid-block (their keys past the last full
    tile of 16 take the AVX512-BF16 dot products), sinks ride along."""
    step = make_step(torch.bfloat16, heads, kv_heads, dim, [0, 17, 47, 300], seed=3)
    q, _, _, k_cache, v_cache, tables, pos, _, _ = step
    sinks = torch.randn(heads)
    amx = CpuAttention([(k_cache, v_cache)]).amx
    assert amx == (cpu_amx.amx_unavailable_reason(CPU, torch.bfloat16, 16, 32) is None)
    assert not CpuAttention([(k_cache.float(), v_cache.float())]).amx  # float32 caches: the vector path
    odd_heads = k_cache.new_zeros(2, BLOCK, 1, 48)
    assert not CpuAttention([(odd_heads, odd_heads)]).amx  # a head size of 48: not a whole tile row
    for window in (None, 21):
        on_tiles = run(*step, dim**-0.5, window, sinks)
        vector = run(*step, dim**-0.5, window, sinks, amx=False)
        expected = reference(q, k_cache, v_cache, tables, pos, dim**-0.5, window, sinks)  # the new tokens written
        for out in (on_tiles, vector):
            assert (out.double() - expected).abs().max().item() < 2**-7
        assert (on_tiles.double() - vector.double()).abs().max().item() <= 2**-7


def test_a_sequence_gives_the_same_bits_alone_and_in_a_batch() -> None:
    q, k_new, v_new, k_cache, v_cache, tables, pos, blocks, offsets = make_step(torch.float32, 6, 2, 32,
                                                                                [40, 3, 90, 17], seed=2)
    together = run(q, k_new, v_new, k_cache, v_cache, tables, pos, blocks, offsets, 0.2, None, None)
    for i in range(4):
        alone = run(q[i : i + 1], k_new[i : i + 1], v_new[i : i + 1], k_cache, v_cache, tables[i : i + 1],
                    pos[i : i + 1], blocks[i : i + 1], offsets[i : i + 1], 0.2, None, None)
        assert torch.equal(alone[0], together[i])


def test_a_step_without_decodes_only_writes() -> None:
    q, k_new, v_new, k_cache, v_cache, tables, pos, blocks, offsets = make_step(torch.float32, 4, 2, 16, [9, 20])
    attention = CpuAttention([(k_cache, v_cache)])
    attention.set_step(blocks, offsets, None, None)
    out = torch.zeros_like(q)
    attention(0, q, k_new, v_new, out, 0.25, None, None)
    assert torch.equal(k_cache[blocks, offsets], k_new) and not out.any()


def test_bad_operands_are_refused() -> None:
    q, k_new, v_new, k_cache, v_cache, tables, pos, blocks, offsets = make_step(torch.float32, 4, 2, 16, [9, 20])
    with pytest.raises(ValueError, match="every cache must be contiguous"):
        CpuAttention([(k_cache, v_cache.bfloat16())])
    with pytest.raises(ValueError, match="cannot serve these caches"):
        CpuAttention([(k_cache.double(), v_cache.double())])
    attention = CpuAttention([(k_cache, v_cache)])
    out = torch.zeros_like(q)
    with pytest.raises(RuntimeError, match="set_step must come before"):
        attention(0, q, k_new, v_new, out, 0.25, None, None)
    with pytest.raises(ValueError, match="need block tables"):
        attention.set_step(blocks, offsets, None, pos)
    with pytest.raises(ValueError, match="int64"):
        attention.set_step(blocks.int(), offsets, tables, pos)
    attention.set_step(blocks, offsets, tables, pos)
    for bad in (dict(q=q.bfloat16()), dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)),
                dict(k=k_new[:1]), dict(q=q[:, :3]), dict(out=out[:1])):
        args = dict(q=q, k=k_new, v=v_new, out=out) | bad
        with pytest.raises(ValueError):
            attention(0, args["q"], args["k"], args["v"], args["out"], 0.25, None, None)
    with pytest.raises(ValueError, match="sinks must be float32"):
        attention(0, q, k_new, v_new, out, 0.25, None, torch.zeros(4, dtype=torch.bfloat16))


def test_unavailable_reasons() -> None:
    assert cpu_attention_unavailable_reason(torch.device("cuda"), torch.float32, 64) == "a CPU kernel, not for cuda"
    assert cpu_attention_unavailable_reason(CPU, torch.int8, 64) == (
        "reads caches of float32, bfloat16 or float16, not torch.int8")
    assert cpu_attention_unavailable_reason(CPU, torch.float32, 72) == (
        "needs a head size that is a multiple of 16 up to 256 (it is 72)")
    assert cpu_attention_unavailable_reason(CPU, torch.float32, 512) is not None
