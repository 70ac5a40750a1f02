"""Paged split-K decode attention (Triton, here through the interpreter) against the engine's torch backend
reading the same paged cache (real KVCache classes, each sequence in its own scattered blocks)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from microscale.attention.metadata import DecodeBatch  # noqa: E402
from microscale.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from microscale.kernels import decode_attention as da  # noqa: E402
from microscale.quant.kv_cache import make_kv_cache  # noqa: E402

# Max abs error against the torch backend. float32: the same arithmetic in another order. 16-bit: the backend
# rounds its scores, probabilities and output to the model dtype, the kernel keeps float32 to the end.
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_case(
    seed: int, lens: list[int], kv_heads: int, group: int, head_dim: int, block_size: int, dtype: torch.dtype,
    quant: str | None = None, static: bool = False, table_dtype: torch.dtype = torch.int64, spare_blocks: int = 3,
):
    """A cache holding every sequence's context in random non-contiguous blocks (block 0 left as padding)."""
    gen = torch.Generator().manual_seed(seed)
    n, heads = len(lens), kv_heads * group
    per_seq = [-(-length // block_size) for length in lens]
    num_blocks = 1 + sum(per_seq) + spare_blocks
    cache = make_kv_cache(quant, kv_heads, head_dim, dtype, torch.device("cpu"))
    if static:
        # Per-head scales small enough that some values clip (int8: at +-127; int4: the range is 7.5 scales either
        # side of 0), as calibration rarely covers everything.
        base = 0.02 if quant == "int8" else 0.3
        cache.set_scales(*(base * (1 + 1.5 * torch.rand(2, kv_heads, generator=gen))))
    cache.allocate(num_blocks, block_size)
    ids = (1 + torch.randperm(num_blocks - 1, generator=gen)).tolist()
    tables = torch.zeros(n, max(per_seq) + 1, dtype=torch.int64)  # one more column: always some padding
    for i, (length, count) in enumerate(zip(lens, per_seq)):
        blocks, ids = ids[:count], ids[count:]
        tables[i, :count] = torch.tensor(blocks)
        pos = torch.arange(length)
        k = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(length, kv_heads, head_dim, generator=gen).to(dtype)
        cache.write(k, v, tables[i, pos // block_size], pos % block_size)
    q = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    sinks = torch.randn(heads, generator=gen) + 1.0
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return cache, q, tables.to(table_dtype), context_lens, sinks


def reference(cache, q, tables, context_lens, scale, window, sinks):
    lens = context_lens.long()
    batch = DecodeBatch(size=len(lens), positions=lens - 1, length=int(lens.max()), block_tables=tables.long())
    return TorchAttentionBackend._decode(q, None, None, cache, batch, scale, window, sinks)


def run_case(cache, q, tables, context_lens, window, sinks, num_splits):
    scale = q.shape[-1] ** -0.5
    ops = cache.kernel_operands()
    got = da.paged_decode_attention(
        q, ops.keys, ops.values, tables, context_lens, scale, window, sinks, ops.k_scale, ops.v_scale, num_splits,
        ops.k_zero, ops.v_zero,
    )
    expected = reference(cache, q, tables, context_lens, scale, window, sinks)
    assert got.shape == expected.shape and got.dtype == q.dtype
    return got, expected


def assert_close(got, expected, dtype):
    err = (got.float() - expected.float()).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err:.3g} > {ATOL[dtype]}"


LENS = [1, 37, 100, 16, 9]  # ragged: a lone token, exactly one 16-block, several tiles


@pytest.mark.parametrize("quant, static", [(None, False), ("int8", False), ("int8", True), ("int4", False),
                                           ("int4", True), ("fp8", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_schemes(quant, static, dtype):
    """Every storage scheme and dtype, window and sinks on, 3 splits."""
    cache, q, tables, lens, sinks = make_case(1, LENS, kv_heads=2, group=2, head_dim=32, block_size=8, dtype=dtype,
                                              quant=quant, static=static)
    got, expected = run_case(cache, q, tables, lens, window=24, sinks=sinks, num_splits=3)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize(
    "seed, kv_heads, group, block_size, window, use_sinks, num_splits, table_dtype",
    [
        (2, 4, 1, 4, None, False, 1, torch.int32),  # MHA, one split
        (3, 2, 2, 8, 20, True, 2, torch.int64),
        (4, 1, 4, 16, None, True, 4, torch.int32),
        (5, 2, 4, 4, 7, False, 3, torch.int64),
        (6, 1, 8, 8, 30, True, 5, torch.int32),  # group 8: the tl.dot path
        (7, 1, 3, 16, None, False, 16, torch.int64),  # a group padded to 4; more splits than tiles: empty splits
        (8, 2, 1, 8, 1, True, 2, torch.int32),  # window 1: the new token alone
    ],
)
def test_shapes(seed, kv_heads, group, block_size, window, use_sinks, num_splits, table_dtype):
    cache, q, tables, lens, sinks = make_case(seed, LENS, kv_heads, group, 16, block_size, torch.float32,
                                              table_dtype=table_dtype)
    got, expected = run_case(cache, q, tables, lens, window, sinks if use_sinks else None, num_splits)
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("use_dot", [False, True])
def test_dot_and_elementwise_paths(monkeypatch, use_dot):
    """The same GQA-2 case through both score/value product paths, in float16 with int8 per-token scales."""
    monkeypatch.setattr(da, "_DOT_MIN_GROUP", 1 if use_dot else 1 << 30)
    cache, q, tables, lens, sinks = make_case(9, [5, 61, 33], 2, 2, 32, 16, torch.float16, quant="int8")
    got, expected = run_case(cache, q, tables, lens, window=40, sinks=sinks, num_splits=2)
    assert_close(got, expected, torch.float16)


def test_default_num_splits():
    """num_splits=None picks a count from the longest context (one host sync) and still matches."""
    cache, q, tables, lens, _ = make_case(10, [3, 90], 2, 2, 16, 8, torch.float32, spare_blocks=300)  # ids > 255
    got, expected = run_case(cache, q, tables, lens, window=None, sinks=None, num_splits=None)
    assert_close(got, expected, torch.float32)
    assert da.choose_num_splits(100_000, 1, 8) == da._MAX_SPLITS
    assert da.choose_num_splits(100_000, 1, 8, window=128) == 1
    assert da.choose_num_splits(100_000, 256, 8) == 1


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_reads_only_the_context(quant):
    """Unwritten slots, spare blocks and the padding block 0 hold NaN (and NaN scales): a read past
    context_lens, outside the window, or through a padding table entry would make the output NaN."""
    cache, q, tables, lens, sinks = make_case(11, [1, 13, 50, 8], 2, 2, 16, 8, torch.float32, quant=quant)
    scale = 16**-0.5
    window = 20
    expected = reference(cache, q, tables, lens, scale, window, sinks)
    ops = cache.kernel_operands()
    poison = torch.ones(ops.keys.shape[:2], dtype=torch.bool)  # [num_blocks, block_size]
    for i, length in enumerate(lens.tolist()):
        for pos in range(max(0, length - window), length):
            poison[tables[i, pos // 8], pos % 8] = False
    if quant is None:
        ops.keys[poison] = float("nan")
        ops.values[poison] = float("nan")
        assert ops.keys.isnan().any()  # the poison reached the cache the kernel reads
    else:
        ops.keys[poison] = 127  # int8 / int4 have no NaN: their scales (and zero points) carry the poison
        ops.values[poison] = 127
        for params in (ops.k_scale, ops.v_scale, ops.k_zero, ops.v_zero):
            if params is not None:
                params[poison] = float("nan")
    got = da.paged_decode_attention(q, ops.keys, ops.values, tables, lens, scale, window, sinks, ops.k_scale,
                                    ops.v_scale, 3, ops.k_zero, ops.v_zero)
    assert torch.isfinite(got).all()
    assert_close(got, expected, torch.float32)


def test_sinks_and_window_change_the_result():
    """Guards against options silently ignored: each must move the output (and the backend agrees)."""
    cache, q, tables, lens, sinks = make_case(12, [40, 70], 1, 2, 16, 8, torch.float32)
    plain, _ = run_case(cache, q, tables, lens, None, None, 2)
    for window, s in ((10, None), (None, sinks)):
        got, expected = run_case(cache, q, tables, lens, window, s, 2)
        assert_close(got, expected, torch.float32)
        assert (got - plain).abs().max() > 1e-2


@pytest.mark.parametrize("use_sinks", [False, True])
def test_empty_context_rows(use_sinks):
    """A row with context_lens 0 (e.g. CUDA-graph padding) has every split empty: it gives 0, not NaN, and
    leaves the other rows as they are."""
    cache, q, tables, lens, sinks = make_case(13, [30, 1], 1, 2, 16, 8, torch.float32)
    ops = cache.kernel_operands()
    s = sinks if use_sinks else None
    expected = reference(cache, q, tables, lens, 0.25, None, s)
    lens = torch.tensor([30, 0, 1], dtype=torch.int32)
    q3, tables3 = torch.cat([q[:1], q[:1], q[1:]]), torch.cat([tables[:1], tables[:1], tables[1:]])
    got = da.paged_decode_attention(q3, ops.keys, ops.values, tables3, lens, 0.25, None, s, num_splits=3)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert_close(got[[0, 2]], expected, torch.float32)
