"""write_kv_cache against the torch KV caches it replaces (`KVCache.write`): the same stored bytes and the same
per-token scales (int4: and zero points), exactly. The kernel rounds as torch does (ties to even) for int8, int4 and
fp8, so fp8 bytes are compared exactly too, ties included, although the interpreter's own float8 cast rounds ties
away from zero."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels.kv_cache_write import write_kv_cache
from microscale.quant.kv_cache import PerTokenScaledKVCache, make_kv_cache

KV_HEADS, HEAD_DIM, NUM_BLOCKS, BLOCK_SIZE = 2, 24, 8, 4  # head_dim not a power of two: masked lanes


def _pair(scheme: str, dtype: torch.dtype, static: torch.Tensor | None = None, seed: int = 0):
    """Two identical caches (the oracle's and the kernel's), filled with junk so untouched slots show."""
    caches = []
    for _ in range(2):
        cache = make_kv_cache(scheme, KV_HEADS, HEAD_DIM, dtype, torch.device("cpu"))
        if static is not None:
            cache.set_scales(static[0], static[1])
        cache.allocate(NUM_BLOCKS, BLOCK_SIZE)
        caches.append(cache)
    gen = torch.Generator().manual_seed(seed)
    junk = torch.randint(-100, 100, caches[0].data.shape, generator=gen).to(caches[0].data.dtype)
    for cache in caches:
        cache.data.copy_(junk)
        if _dynamic(cache):
            cache.token_scales.fill_(-3.0)
    return caches


def _slots(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T distinct slots in a few non-adjacent blocks, in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.tensor([6, 1, 3, 7])
    slots = torch.randperm(len(blocks) * BLOCK_SIZE, generator=gen)[:T]
    return blocks[slots // BLOCK_SIZE], slots % BLOCK_SIZE


def _dynamic(cache) -> bool:
    return isinstance(cache, PerTokenScaledKVCache) and cache.dynamic


def _run(oracle, cache, k, v, blocks, offsets) -> None:
    oracle.write(k, v, blocks, offsets)
    ops = cache.kernel_operands()
    write_kv_cache(k, v, ops.keys, ops.values, blocks, offsets, ops.k_scale, ops.v_scale, ops.dynamic, ops.k_zero,
                   ops.v_zero)


def _assert_same(oracle, cache) -> None:
    assert torch.equal(cache.data.view(torch.uint8), oracle.data.view(torch.uint8)), "stored bytes differ"
    if _dynamic(oracle):
        assert torch.equal(cache.token_scales, oracle.token_scales), "per-token scales differ"


SCHEMES = {
    "none": None,
    "int8-dynamic": None,
    "int8-static": torch.tensor([[0.013, 0.031], [0.02, 0.0075]]),  # [key, value] x [kv_heads]
    "int4-dynamic": None,
    "int4-static": torch.tensor([[0.11, 0.4], [0.3, 0.05]]),
    "fp8": torch.tensor([0.01, 0.004]),  # one scale each for keys and values
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matches_cache_write(scheme, dtype):
    oracle, cache = _pair(scheme.split("-")[0], dtype, SCHEMES[scheme])
    T = 11
    gen = torch.Generator().manual_seed(1)
    # k and v as the attention layer has them: views into one packed qkv row (token stride > heads * head_dim).
    qkv = (torch.randn(T, 4 * KV_HEADS, HEAD_DIM, generator=gen) * torch.linspace(0.05, 3, HEAD_DIM)).to(dtype)
    k, v = qkv[:, 2 * KV_HEADS : 3 * KV_HEADS], qkv[:, 3 * KV_HEADS :]
    k[3, 1] = 0.0  # an all-zero (token, head): dynamic int8 and int4 give it scale 1
    k[4, 0] = -0.5  # a constant one: int4's zero point holds it
    blocks, offsets = _slots(T, seed=2)
    _run(oracle, cache, k, v, blocks, offsets)
    _assert_same(oracle, cache)
    written = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, dtype=torch.bool)
    written[blocks, offsets] = True
    untouched = _pair(scheme.split("-")[0], dtype, SCHEMES[scheme])[0]  # same junk, nothing written
    assert torch.equal(cache.data[:, ~written].view(torch.uint8), untouched.data[:, ~written].view(torch.uint8))
    if scheme.endswith("-dynamic"):
        zero_vector = cache.token_scales[0, blocks[3], offsets[3], 1].flatten()  # int8: scale; int4: scale, zero
        assert zero_vector[0] == 1.0 and (zero_vector[1:] == 0).all()
        assert (cache.token_scales[:, ~written] == -3.0).all()
    if scheme == "int4-dynamic":  # the constant vector: codes 0, its value held by the zero point
        assert (cache.data[0, blocks[4], offsets[4], 0] == 0).all()
        assert (cache.read(blocks[4:5])[0][0, offsets[4], 0] == -0.5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static", "int4-dynamic", "int4-static", "fp8"])
def test_ties_round_to_even(scheme, dtype):
    """(x - zero) / scale exactly halfway between two representable values (power-of-two scales keep the
    quotient exact) and just beside halfway: torch rounds ties to even, and so must the kernel."""
    T = 8
    gen = torch.Generator().manual_seed(3)
    shape = (T, KV_HEADS, HEAD_DIM)
    zero = 0.0
    if scheme == "fp8":
        scale = 0.25
        # Midpoints of the E4M3 grid: 9.5 and 17 (even neighbour above and below), 7.75 and 15.5 (rounding up
        # carries into the exponent), 3/1024 (subnormal), 450 (beyond 448: saturates), and their negatives.
        ties = torch.tensor([9.5, 17.0, 7.75, 15.5, 3 / 1024, 450.0, 0.5 + 1 / 32, 13.0])
        q = ties[torch.randint(len(ties), shape, generator=gen)]
        static = torch.full((2,), scale)
    elif scheme.startswith("int8"):
        scale = 2.0**-5
        q = torch.randint(-127, 127, shape, generator=gen) + 0.5
        static = torch.full((2, KV_HEADS), scale) if scheme == "int8-static" else None
    else:
        # Codes 0..15 around zero point -7.5 scale: fixed when static; dynamic, element 0 is the vector's
        # minimum and element 1 its maximum, so the zero point and scale come out exactly so too.
        scale, zero = 2.0**-5, -7.5 * 2.0**-5
        q = torch.randint(0, 15, shape, generator=gen) + 0.5
        if scheme == "int4-dynamic":
            q[..., :2] = torch.tensor([0.0, 15.0])
        static = torch.full((2, KV_HEADS), scale) if scheme == "int4-static" else None
    if not scheme.startswith("int4"):
        q = q * (torch.randint(0, 2, q.shape, generator=gen) * 2 - 1)
    if scheme == "int8-dynamic":
        q[..., 0] = 127.0  # amax / 127 is exactly `scale`, so the quotients stay exact
    x = (q * scale + zero).to(dtype)
    assert torch.equal((x.float() - zero) / scale, q), "the test's ties are not exact"
    beside = x.float() + torch.where(torch.rand(x.shape, generator=gen) < 0.5, 1e-3, -1e-3) * scale
    k, v = x, beside.to(dtype)  # v: near-ties (exact ones too in bfloat16, where 1e-3 * scale rounds away)
    oracle, cache = _pair(scheme.split("-")[0], dtype, None if static is None else static)
    blocks, offsets = _slots(T, seed=4)
    _run(oracle, cache, k, v, blocks, offsets)
    _assert_same(oracle, cache)


def test_all_zero_token_gets_scale_one():
    oracle, cache = _pair("int8", torch.bfloat16)
    k = torch.zeros(2, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    v = torch.randn(2, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    blocks, offsets = torch.tensor([5, 2]), torch.tensor([3, 0])
    _run(oracle, cache, k, v, blocks, offsets)
    _assert_same(oracle, cache)
    assert (cache.token_scales[0, blocks, offsets] == 1.0).all()
    assert (cache.data[0, blocks, offsets] == 0).all()


def test_rejects_mismatched_operands():
    cache = make_kv_cache("int8", KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
    cache.allocate(NUM_BLOCKS, BLOCK_SIZE)
    ops = cache.kernel_operands()
    k = torch.randn(1, KV_HEADS, HEAD_DIM)
    slot = torch.tensor([0]), torch.tensor([0])
    with pytest.raises(ValueError):
        write_kv_cache(k, k, ops.keys, ops.values, *slot, dynamic=True)  # scales missing
    with pytest.raises(ValueError):
        write_kv_cache(k[:, :, :8], k[:, :, :8], ops.keys, ops.values, *slot, ops.k_scale, ops.v_scale, True)
    int4 = make_kv_cache("int4", KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"))
    int4.allocate(NUM_BLOCKS, BLOCK_SIZE)
    ops = int4.kernel_operands()
    with pytest.raises(ValueError, match="zero points"):
        write_kv_cache(k, k, ops.keys, ops.values, *slot, ops.k_scale, ops.v_scale, True)  # zero points missing
