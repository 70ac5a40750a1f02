"""The Triton paged prefill attention kernel (run through Triton's interpreter on CPU) against the engine's torch
backend, chunk by chunk, over real KV caches: fresh prompts, chunked-prefill continuations and prefix-cache hits
in one batch, GQA, sliding windows, sinks, caches in the model dtype, int8 and int4 (dynamic and static scales)
and fp8,
with each sequence's blocks scattered over the cache."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from microscale.attention.metadata import PrefillChunk
from microscale.attention.torch_backend import TorchAttentionBackend
from microscale.kernels import prefill_attention as kernel_module
from microscale.kernels.prefill_attention import paged_prefill_attention
from microscale.quant.kv_cache import KVCache, kv_scales_from_amax, make_kv_cache

# (atol, rtol) of kernel vs torch backend per dtype. float32: both exact up to summation order. bfloat16 and
# float16: the backend rounds probabilities and outputs through the model dtype at other points than the kernel,
# a unit or two in the last place of outputs up to ~3 (bfloat16's is 2^-8 relative).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}

# (context_start, query_len): fresh prompts, continuations / prefix hits (context > 0), 1-token chunks, chunks
# spanning several query blocks (BLOCK_M is 64 / group size, at least 16), and a context longer than two key
# blocks (BLOCK_N = 64) so that a window skips whole key blocks.
MIXED_CHUNKS = [(0, 7), (13, 5), (40, 1), (0, 1), (22, 40), (150, 3), (60, 17)]


@dataclass
class Case:
    q: torch.Tensor
    cache: KVCache
    tables: torch.Tensor  # [chunks, max_blocks], padded with 0
    query_starts: torch.Tensor
    context_starts: torch.Tensor
    chunks: list[PrefillChunk]
    new_kv: list[tuple[torch.Tensor, torch.Tensor]]  # each chunk's new keys/values as the cache returned them


def build_case(
    chunk_specs: list[tuple[int, int]], *, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
    kv_quant: str | None, block_size: int, index_dtype: torch.dtype = torch.int64, poison: bool = False,
    trailing_rows: int = 0, seed: int = 0,
) -> Case:
    """Chunks (context_start, query_len) of distinct sequences, each written (prefix, then new tokens) into its
    own randomly chosen blocks; block 0 is kept as padding. `poison`: every slot no sequence wrote (block 0
    included) holds NaN (int8 / int4: its dynamic scale is NaN)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [ctx + qlen for ctx, qlen in chunk_specs]
    block_counts = [-(-n // block_size) for n in lengths]
    num_blocks = 1 + sum(block_counts) + 3
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)

    kv = [(torch.randn(n, kv_heads, head_dim, generator=gen), torch.randn(n, kv_heads, head_dim, generator=gen))
          for n in lengths]
    scheme = kv_quant.removesuffix("-static") if kv_quant else None
    cache = make_kv_cache(scheme, kv_heads, head_dim, dtype, torch.device("cpu"))
    if kv_quant in ("int8-static", "int4-static", "fp8"):
        k_amax = torch.cat([k for k, _ in kv]).abs().amax(dim=(0, 2))
        v_amax = torch.cat([v for _, v in kv]).abs().amax(dim=(0, 2))
        k_scale, _ = kv_scales_from_amax(scheme, k_amax, k_amax)
        v_scale, _ = kv_scales_from_amax(scheme, v_amax, v_amax)
        cache.set_scales(k_scale, v_scale)
    cache.allocate(num_blocks, block_size)
    if poison:
        if cache.data.dtype in (torch.int8, torch.uint8):
            cache.data.fill_(127)
            if getattr(cache, "token_scales", None) is not None:
                cache.token_scales.fill_(float("nan"))
        else:
            cache.data.fill_(float("nan"))

    tables, chunks, new_kv, start = [], [], [], 0
    for (ctx, qlen), (k, v), count in zip(chunk_specs, kv, block_counts):
        table = [ids.pop() for _ in range(count)]
        for lo, hi in ((0, ctx), (ctx, ctx + qlen)):  # the cached prefix, then this step's tokens
            if hi > lo:
                pos = torch.arange(lo, hi)
                blocks = torch.tensor(table)[pos // block_size]
                stored = cache.write(k[lo:hi].to(dtype), v[lo:hi].to(dtype), blocks, pos % block_size)
        new_kv.append(stored)
        chunks.append(PrefillChunk(start, qlen, ctx, torch.tensor(table)))
        tables.append(table)
        start += qlen

    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=index_dtype)
    starts = torch.tensor([0] + [c.query_start + c.query_len for c in chunks], dtype=index_dtype)
    q = torch.randn(start + trailing_rows, heads, head_dim, generator=gen).to(dtype)
    context_starts = torch.tensor([c.context_start for c in chunks], dtype=index_dtype)
    return Case(q, cache, padded, starts, context_starts, chunks, new_kv)


def run_kernel(case: Case, scale: float, window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    ops = case.cache.kernel_operands()
    return paged_prefill_attention(
        case.q, ops.keys, ops.values, case.tables, case.query_starts, case.context_starts,
        max(c.query_len for c in case.chunks), scale, window, sinks, ops.k_scale, ops.v_scale, ops.k_zero, ops.v_zero,
    )


def expected(case: Case, scale: float, window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    rows = [
        TorchAttentionBackend._prefill(case.q[c.query_start:c.query_start + c.query_len], k, v, case.cache, c,
                                       scale, window, sinks)
        for c, (k, v) in zip(case.chunks, case.new_kv)
    ]
    return torch.cat(rows)


def check(case: Case, scale: float, window: int | None, sinks: torch.Tensor | None) -> None:
    out = run_kernel(case, scale, window, sinks)
    n = case.chunks[-1].query_start + case.chunks[-1].query_len
    ref = expected(case, scale, window, sinks)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert torch.isfinite(out[:n]).all()
    atol, rtol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(out[:n].float(), ref.float(), atol=atol, rtol=rtol)


KV_QUANTS = [None, "int8", "int8-static", "int4", "int4-static", "fp8"]


WINDOW = 6  # shorter than most contexts


@pytest.mark.parametrize("kv_quant", KV_QUANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_matches_torch_backend(kv_quant, dtype, heads, kv_heads):
    """A mixed batch, plain causal and with both a window and sinks."""
    case = build_case(MIXED_CHUNKS, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype, kv_quant=kv_quant,
                      block_size=8, seed=heads * 10 + kv_heads)
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(1)) + 1.0
    check(case, 0.25, None, None)
    check(case, 0.25, WINDOW, sinks)


@pytest.mark.parametrize("window,with_sinks", [(WINDOW, False), (None, True)])
def test_window_or_sinks_alone(window, with_sinks):
    heads = 4
    case = build_case(MIXED_CHUNKS, heads=heads, kv_heads=2, head_dim=16, dtype=torch.bfloat16, kv_quant="int8",
                      block_size=8, seed=5)
    sinks = torch.randn(heads, generator=torch.Generator().manual_seed(1)) + 1.0 if with_sinks else None
    check(case, 0.25, window, sinks)


@pytest.mark.parametrize("seed", range(8))
def test_random_batches(seed):
    """Random shapes: head_dim not a power of two, block sizes 4/8/16, float16 too, int32 or int64 indices, a
    non-contiguous block table, windows from 1 (a query sees only itself) up, chunks of 1 to 40 tokens after
    prefixes of 0 to 60."""
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([1, 2, 4])
    head_dim = rng.choice([16, 24, 32])
    specs = [(rng.choice([0, rng.randint(1, 60)]), rng.choice([1, rng.randint(2, 40)]))
             for _ in range(rng.randint(2, 5))]
    case = build_case(
        specs, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]), kv_quant=rng.choice(KV_QUANTS),
        block_size=rng.choice([4, 8, 16]), index_dtype=rng.choice([torch.int32, torch.int64]), seed=seed,
    )
    if seed % 2:
        case.tables = case.tables.t().contiguous().t()  # a column-major block table: strides honoured
    window = rng.choice([None, 1, rng.randint(2, 30)])
    sinks = torch.randn(heads) * 2 if rng.random() < 0.5 else None
    check(case, rng.uniform(0.05, 0.5), window, sinks)


@pytest.mark.parametrize("kv_quant", KV_QUANTS)
@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, True)])
def test_unwritten_slots_never_read(kv_quant, window, with_sinks):
    """Every slot past each chunk's context, the spare blocks and padding block 0 hold NaN (int8: NaN scales):
    none may reach an output. Block size 16 leaves most of each sequence's last block unwritten."""
    heads, kv_heads, head_dim = 4, 2, 16
    case = build_case(MIXED_CHUNKS, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float32,
                      kv_quant=kv_quant, block_size=16, poison=True, seed=3)
    sinks = torch.randn(heads) if with_sinks else None
    check(case, head_dim**-0.5, window, sinks)


def test_rows_outside_chunks_untouched(monkeypatch):
    """Query rows past a chunk's end are computed (the tile is padded) but must not be stored: rows after the last
    chunk keep what the output buffer held (NaN here)."""
    case = build_case([(3, 5), (0, 2), (10, 3)], heads=2, kv_heads=1, head_dim=16, dtype=torch.float32,
                      kv_quant=None, block_size=4, trailing_rows=20, seed=4)
    full_like = torch.full_like
    monkeypatch.setattr(kernel_module.torch, "empty_like", lambda x: full_like(x, float("nan")))
    out = run_kernel(case, 0.25, None, None)
    monkeypatch.undo()
    assert torch.isnan(out[10:]).all()
    torch.testing.assert_close(out[:10], expected(case, 0.25, None, None), atol=1e-5, rtol=1e-5)
