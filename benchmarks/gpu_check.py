"""One command for the first GPU hour: every Triton kernel against its torch reference, whole models through the
Triton and torch kernel backends (with and without CUDA graphs), and a performance table against the measured HBM
bandwidth. Sized to finish in under 8 minutes on one H100/H200, start-up and Triton compiles included (not yet
timed on one: each row's seconds are in the JSON).

    python benchmarks/gpu_check.py                  # GPU host, from the repo root: JSON + a markdown table (last)
    python benchmarks/gpu_check.py --quick          # tiny shapes and stand-in models: a minute or two
    python benchmarks/gpu_check.py --only "fused MoE" --skip-e2e --skip-perf     # re-run some rows
    python benchmarks/gpu_check.py --dry-run        # CPU: kernels through Triton's interpreter, tiny everything

Needs only microscale's own dependencies and Triton (the CUDA builds of torch bring it); no network, no
transformers: the Qwen3 model is a shrunk config with dummy weights. The microscale run is this checkout's.

Sections (each row is recorded, with its error, whatever happens to the others):
(a) kernels: each Triton kernel on realistic shapes against the torch code it replaces, with the tolerances of its
    tests in tests/kernels/ (max error and the criterion in every row);
(b) e2e: greedy tokens of tiny Llama, Qwen3 and gpt-oss (and quantized variants), Triton backend (eager and with
    decode CUDA graphs) against the torch backend. float32 must match exactly (and prompt logits within the tests'
    tolerance); where tokens differ, the first difference must be a near-tie of the reference's own logits;
(c) perf: HBM bandwidth (device-to-device copy), decode attention at batch 64 x 4k context, the quantized GEMMs
    against bf16 cuBLAS on Llama-3.1-8B's projections, decode tokens/s of dummy-weight Llama-3.1-8B (bf16, FP8,
    MXFP4) and gpt-oss-20b (MXFP4) with CUDA graphs, and the seed's offline shape on gpt-oss-20b, each as a share
    of the weight-bytes roofline.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This checkout's microscale, installed or not: the commit recorded is the code that ran.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402 - torch and microscale import no Triton: TRITON_INTERPRET can still be set in main()
import torch.nn.functional as F  # noqa: E402
from decode_timing import decode_tokens_per_s  # noqa: E402

from microscale import LLM, SamplingParams  # noqa: E402
from microscale.attention.metadata import DecodeBatch, PrefillChunk  # noqa: E402
from microscale.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from microscale.bench import report  # noqa: E402
from microscale.layers.activation import ClampedSwiGLU, SiluAndMul  # noqa: E402
from microscale.layers.moe import FusedMoE, route_top_k  # noqa: E402
from microscale.layers.norm import RMSNorm  # noqa: E402
from microscale.quant.fp8 import fp8_matmul_reference, fp8_scale, quantize_fp8, scaled_mm_rowwise  # noqa: E402
from microscale.quant.kv_cache import KVCache, kv_scales_from_amax, make_kv_cache  # noqa: E402
from microscale.quant.mxfp4 import pack_mxfp4, unpack_mxfp4  # noqa: E402
from microscale.quant.mxfp4_experts import Mxfp4ExpertsMethod  # noqa: E402

TINY_LLAMA = REPO / "models" / "tiny-llama-pycode"
TINY_GPTOSS = REPO / "models" / "tiny-gptoss-pycode"
CONFIGS = REPO / "configs" / "models"
BF16 = torch.bfloat16
GIB = 1 << 30
EPS = 1e-5
GPT_OSS_LIMIT, GPT_OSS_ALPHA = 7.0, 1.702
# KV cache kinds: (scheme, static scales set from the data's amax, as calibration would).
KV_KINDS = {"none": (None, False), "int8": ("int8", False), "int8-static": ("int8", True), "int4": ("int4", False),
            "int4-static": ("int4", True), "fp8": ("fp8", True)}


# ---- sizes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int | None = None
    sinks: bool = False


@dataclass(frozen=True)
class Sizes:
    attention: tuple[AttentionShape, ...]  # kernel checks: a Llama-3.1-8B layer, a gpt-oss layer (window, sinks)
    block_size: int
    decode_lens: tuple[int, ...]  # ragged decode contexts
    prefill_spans: tuple[tuple[int, int], ...]  # (cached prefix, new tokens) per chunk
    tokens: int  # rows for KV writes, norms and activations
    hidden: int  # Llama's norm / MLP
    inter: int
    oss_hidden: int  # gpt-oss's (float32 norm weights, clamped SwiGLU)
    oss_inter: int
    gemm: tuple[int, int]  # (N, K) of the GEMM checks
    gemm_ms: tuple[int, ...]  # M of the GEMM checks: decode (split-K GEMV) and prefill (tl.dot) variants
    moe: tuple[int, int, int, int]  # experts, top-k, hidden, intermediate
    moe_tokens: tuple[int, ...]
    e2e_prompts: int
    e2e_tokens: int
    copy_bytes: int  # HBM bandwidth probe
    attn_batch: int  # decode attention timing: batch x context, the Llama layer
    attn_context: int
    gemm_shapes: tuple[tuple[str, int, int], ...]  # (projection, N, K) timed
    perf_ms: tuple[int, ...]
    shrink_models: bool  # perf models: the real configs, or shrunk stand-ins
    batches: tuple[int, ...]  # decode tokens/s
    prompt_len: int
    new_tokens: int
    offline: tuple[int, int, int]  # batch, input, output: the seed's offline shape
    max_model_len: int
    kv_gib: float


LLAMA_8B_PROJECTIONS = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))

FULL = Sizes(
    attention=(AttentionShape("Llama-3.1-8B", 32, 8, 128), AttentionShape("gpt-oss", 64, 8, 64, 128, True)),
    block_size=16, decode_lens=(1, 17, 129, 1000, 2048, 4096, 3001, 512),
    prefill_spans=((0, 512), (1000, 37), (0, 1), (2000, 300), (64, 129)),
    tokens=2048, hidden=4096, inter=14336, oss_hidden=2880, oss_inter=2880,
    gemm=(6144, 4096), gemm_ms=(1, 16, 4096), moe=(32, 4, 2880, 2880), moe_tokens=(1, 64, 1024),
    e2e_prompts=4, e2e_tokens=24,
    copy_bytes=4 * GIB, attn_batch=64, attn_context=4096, gemm_shapes=LLAMA_8B_PROJECTIONS, perf_ms=(1, 16, 4096),
    shrink_models=False, batches=(1, 8, 64), prompt_len=128, new_tokens=64, offline=(32, 512, 256),
    max_model_len=1024, kv_gib=8.0,
)
# --quick and --dry-run: the shapes of the kernel tests (ragged tiles, several splits), tiny stand-in models.
TINY = Sizes(
    attention=(AttentionShape("llama-like", 4, 2, 32), AttentionShape("gpt-oss-like", 4, 2, 16, 24, True)),
    block_size=8, decode_lens=(1, 37, 100, 16, 9), prefill_spans=((0, 7), (13, 5), (40, 1), (22, 40), (60, 17)),
    tokens=13, hidden=96, inter=48, oss_hidden=64, oss_inter=40,
    gemm=(72, 96), gemm_ms=(1, 16, 40), moe=(8, 2, 64, 64), moe_tokens=(1, 24),
    e2e_prompts=2, e2e_tokens=3,
    copy_bytes=16 << 20, attn_batch=4, attn_context=64,
    gemm_shapes=(("qkv", 96, 64), ("gate_up", 256, 64), ("down", 64, 128)), perf_ms=(1, 16, 40),
    shrink_models=True, batches=(1, 2, 4), prompt_len=8, new_tokens=3, offline=(2, 8, 4),
    max_model_len=64, kv_gib=0.02,
)


# ---- rows ---------------------------------------------------------------------------------------------------


class Skip(Exception):
    """A check that cannot run here (e.g. FP8 below sm_89): recorded as skipped, with the reason."""


@dataclass
class Measure:
    max_err: float
    passed: bool
    tol: str
    detail: str = ""

    def row(self) -> dict:
        return {"status": "pass" if self.passed else "fail", "max_err": self.max_err, "tol": self.tol,
                "detail": self.detail}


def within(got: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor | float, tol: str) -> Measure:
    """|got - ref| <= allowed everywhere (a NaN fails); max_err is the largest |got - ref|."""
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    err = (got.double() - ref.double()).abs()
    passed = bool((err <= allowed).all())
    return Measure(err.max().item() if err.numel() else 0.0, passed, tol)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at each value of x (its subnormal spacing below the normal range), as float32."""
    finfo = torch.finfo(x.dtype)
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp(min=finfo.tiny)))) * finfo.eps


def within_ulps(got: torch.Tensor, ref: torch.Tensor, ulps: float, max_off: float | None = None) -> Measure:
    """Within `ulps` units in the last place of ref's dtype; max_off: the largest fraction of values that may
    differ at all. max_err is in ulps."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise ValueError(f"{got.dtype} {tuple(got.shape)} != reference {ref.dtype} {tuple(ref.shape)}")
    in_ulps = (got.float() - ref.float()).abs() / ulp(ref)
    off = (got.float() != ref.float()).float().mean().item() if got.numel() else 0.0
    passed = bool((in_ulps <= ulps).all()) and (max_off is None or off <= max_off)
    tol = f"{ulps:g} ulp" + (f", <= {max_off:.0%} of values off" if max_off is not None else "")
    return Measure(in_ulps.max().item() if got.numel() else 0.0, passed, tol, f"{off:.2%} of values off")


def exact(got: torch.Tensor, ref: torch.Tensor) -> Measure:
    """Bit for bit; max_err counts the differing elements."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        raise ValueError(f"{got.dtype} {tuple(got.shape)} != reference {ref.dtype} {tuple(ref.shape)}")
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    differing = int((got.view(width) != ref.view(width)).sum())
    return Measure(float(differing), differing == 0, "bit-exact")


def also(primary: Measure, *others: Measure) -> Measure:
    """primary's error, passing only if every measure passes; a failing other is named in the detail."""
    failing = [f"{m.tol} failed (err {m.max_err:.3g})" for m in others if not m.passed]
    detail = "; ".join(filter(None, [primary.detail, *failing]))
    return Measure(primary.max_err, primary.passed and not failing, primary.tol, detail)


class Runner:
    """Runs each check or measurement and records a row whatever happens: a failure, a skip or an exception never
    stops the others."""

    def __init__(self, only: str | None = None) -> None:
        self.rows: list[dict] = []
        self.only = only

    def run(self, section: str, name: str, fn: Callable[[], Measure | dict]) -> dict | None:
        if self.only and self.only.lower() not in name.lower():
            return None
        start = time.perf_counter()
        try:
            result = fn()
            result = result.row() if isinstance(result, Measure) else result
        except Skip as why:
            result = {"status": "skip", "detail": str(why)}
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            result = {"status": "error", "detail": f"{type(error).__name__}: {error}"}
            release_memory()
        row = {"section": section, "name": name, **result, "seconds": round(time.perf_counter() - start, 3)}
        self.rows.append(row)
        print(f"[{section}] {name}: {row['status']}" + (f" ({row['detail']})" if row.get("detail") else ""),
              file=sys.stderr, flush=True)
        return row


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def size_text(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / (1 << 20):.2f} MiB"


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def fp8_unavailable(device: torch.device) -> str | None:
    from microscale.kernels.fp8_gemm import fp8_gemm_unavailable_reason  # imports triton: after main() set up

    return fp8_gemm_unavailable_reason(device)


# ---- (a) kernel checks --------------------------------------------------------------------------------------


@dataclass
class PagedCase:
    """Sequences written into a paged KV cache, each into its own shuffled blocks (block 0 left as padding)."""

    cache: KVCache
    tables: torch.Tensor  # [sequences, max_blocks + 1] int32, padded with 0
    chunks: list[PrefillChunk]  # each sequence's last written span, as a prefill chunk of a flat batch
    new_kv: list[tuple[torch.Tensor, torch.Tensor]]  # those spans' keys/values as the cache returned them
    context_lens: torch.Tensor  # int32


def paged_case(spans: list[tuple[int, int]], shape: AttentionShape, kv: str, block_size: int,
               device: torch.device, seed: int) -> PagedCase:
    """spans: (cached prefix, new tokens) per sequence; the prefix is written first, then the new tokens."""
    gen = generator(device, seed)
    lengths = [ctx + new for ctx, new in spans]
    counts = [-(-n // block_size) for n in lengths]
    num_blocks = 1 + sum(counts)
    kvs = [tuple(torch.randn(n, shape.kv_heads, shape.head_dim, generator=gen, device=device) for _ in "kv")
           for n in lengths]
    scheme, static = KV_KINDS[kv]
    cache = make_kv_cache(scheme, shape.kv_heads, shape.head_dim, BF16, device)
    if static:
        amax = [torch.stack([x.abs().amax(dim=(0, 2)) for x in half]).amax(0) for half in zip(*kvs)]
        cache.set_scales(*kv_scales_from_amax(scheme, *amax))
    cache.allocate(num_blocks, block_size)
    ids = 1 + torch.randperm(num_blocks - 1, generator=gen, device=device)
    tables = torch.zeros(len(spans), max(counts) + 1, dtype=torch.int32, device=device)
    chunks, new_kv, used, query_start = [], [], 0, 0
    for i, ((ctx, new), (k, v), count) in enumerate(zip(spans, kvs, counts)):
        table = ids[used:used + count]
        used += count
        tables[i, :count] = table
        for lo, hi in ((0, ctx), (ctx, ctx + new)):
            if hi > lo:
                pos = torch.arange(lo, hi, device=device)
                stored = cache.write(k[lo:hi].to(BF16), v[lo:hi].to(BF16), table[pos // block_size],
                                     pos % block_size)
        new_kv.append(stored)
        chunks.append(PrefillChunk(query_start, new, ctx, table.long()))
        query_start += new
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return PagedCase(cache, tables, chunks, new_kv, context_lens)


def attention_inputs(tokens: int, shape: AttentionShape, device: torch.device, seed: int):
    gen = generator(device, seed)
    q = torch.randn(tokens, shape.heads, shape.head_dim, generator=gen, device=device).to(BF16)
    sinks = torch.randn(shape.heads, generator=gen, device=device) + 1.0 if shape.sinks else None
    return q, sinks, shape.head_dim**-0.5


def check_decode_attention(sizes: Sizes, shape: AttentionShape, kv: str, device: torch.device) -> Measure:
    """Split-K paged decode against the torch backend's decode over the same paged cache (test tolerance: 3e-2
    absolute in bfloat16, where the backend rounds scores and probabilities to the model dtype)."""
    from microscale.kernels.decode_attention import paged_decode_attention

    case = paged_case([(n - 1, 1) for n in sizes.decode_lens], shape, kv, sizes.block_size, device, seed=1)
    q, sinks, scale = attention_inputs(len(sizes.decode_lens), shape, device, seed=2)
    ops = case.cache.kernel_operands()
    got = paged_decode_attention(q, ops.keys, ops.values, case.tables, case.context_lens, scale, shape.window, sinks,
                                 ops.k_scale, ops.v_scale, k_zero=ops.k_zero, v_zero=ops.v_zero)
    lens = case.context_lens.long()
    batch = DecodeBatch(size=len(lens), positions=lens - 1, length=int(lens.max()), block_tables=case.tables.long())
    ref = TorchAttentionBackend._decode(q, None, None, case.cache, batch, scale, shape.window, sinks)
    return within(got, ref, 3e-2, "3e-2 abs")


def check_prefill_attention(sizes: Sizes, shape: AttentionShape, kv: str, device: torch.device) -> Measure:
    """Varlen prefill/extend chunks against the torch backend, chunk by chunk (test tolerance in bfloat16)."""
    from microscale.kernels.prefill_attention import paged_prefill_attention

    spans = list(sizes.prefill_spans)
    case = paged_case(spans, shape, kv, sizes.block_size, device, seed=3)
    q, sinks, scale = attention_inputs(sum(new for _, new in spans), shape, device, seed=4)
    query_starts = torch.tensor([c.query_start for c in case.chunks] + [len(q)], dtype=torch.int32, device=device)
    context_starts = torch.tensor([ctx for ctx, _ in spans], dtype=torch.int32, device=device)
    ops = case.cache.kernel_operands()
    got = paged_prefill_attention(q, ops.keys, ops.values, case.tables, query_starts, context_starts,
                                  max(new for _, new in spans), scale, shape.window, sinks, ops.k_scale, ops.v_scale,
                                  ops.k_zero, ops.v_zero)
    ref = torch.cat([
        TorchAttentionBackend._prefill(q[c.query_start:c.query_start + c.query_len], k, v, case.cache, c, scale,
                                       shape.window, sinks)
        for c, (k, v) in zip(case.chunks, case.new_kv)
    ])
    return within(got, ref, 2e-2 + 2e-2 * ref.double().abs(), "2e-2 abs + 2e-2 rel")


def check_kv_cache_write(sizes: Sizes, kv: str, device: torch.device) -> Measure:
    """The KV write kernel against KVCache.write: the same stored bytes (and per-token scales), bit for bit."""
    from microscale.kernels.kv_cache_write import write_kv_cache

    shape, T, bs = sizes.attention[0], sizes.tokens, sizes.block_size
    gen = generator(device, 5)
    # k and v as the attention layer has them: views into one packed qkv row.
    qkv = torch.randn(T, shape.heads + 2 * shape.kv_heads, shape.head_dim, generator=gen, device=device).to(BF16)
    k, v = qkv[:, shape.heads:shape.heads + shape.kv_heads], qkv[:, shape.heads + shape.kv_heads:]
    num_blocks = -(-T // bs) + 2
    slots = torch.randperm(num_blocks * bs, generator=gen, device=device)[:T]
    scheme, static = KV_KINDS[kv]
    caches = []
    for _ in range(2):
        cache = make_kv_cache(scheme, shape.kv_heads, shape.head_dim, BF16, device)
        if static:
            cache.set_scales(*kv_scales_from_amax(scheme, k.float().abs().amax(dim=(0, 2)),
                                                  v.float().abs().amax(dim=(0, 2))))
        cache.allocate(num_blocks, bs)
        caches.append(cache)
    oracle, cache = caches
    oracle.write(k, v, slots // bs, slots % bs)
    ops = cache.kernel_operands()
    write_kv_cache(k, v, ops.keys, ops.values, slots // bs, slots % bs, ops.k_scale, ops.v_scale, ops.dynamic,
                   ops.k_zero, ops.v_zero)
    scales = [exact(cache.token_scales, oracle.token_scales)] if getattr(oracle, "token_scales", None) is not None \
        else []
    return also(exact(cache.data, oracle.data), *scales)


def norm_inputs(T: int, hidden: int, float32_weight: bool, device: torch.device):
    gen = generator(device, 6)
    norm = RMSNorm(hidden, EPS, BF16, float32_weight).to(device)
    norm.weight.data.copy_(1 + 0.5 * torch.randn(hidden, generator=gen, device=device))
    # Rows of very different magnitudes, so the normalisation matters.
    scale = torch.logspace(-2, 2, T, device=device)[:, None]
    x, residual = ((torch.randn(T, hidden, generator=gen, device=device) * scale).to(BF16) for _ in range(2))
    return norm, x, residual


def check_rms_norm(T: int, hidden: int, float32_weight: bool, device: torch.device) -> Measure:
    """Fused add + RMSNorm against RMSNorm.forward: the new residual exactly, the output within 1 ulp with at most
    3% of values off (tests/kernels/test_norm.py)."""
    from microscale.kernels.norm import rms_norm

    norm, x, residual = norm_inputs(T, hidden, float32_weight, device)
    out, new_residual = rms_norm(x, norm.weight, EPS, float32_weight, residual=residual)
    ref, ref_residual = norm(x, residual)
    return also(within_ulps(out, ref, 1, max_off=0.03), exact(new_residual, ref_residual))


def fp8_saturating_scale(ref: torch.Tensor) -> torch.Tensor:
    """A scale under which the largest values saturate at 448, as calibration rarely covers everything."""
    return (ref.float().abs().max() / 400).reshape(())


def check_rms_norm_fp8(T: int, hidden: int, device: torch.device) -> Measure:
    """FP8-emitting add + RMSNorm: exactly quantize_fp8 of its own 16-bit output, within 1 FP8 ulp of
    quantize_fp8 of torch's."""
    from microscale.kernels.norm import rms_norm

    if reason := fp8_unavailable(device):
        raise Skip(reason)
    norm, x, residual = norm_inputs(T, hidden, False, device)
    ref, _ = norm(x, residual)
    scale = fp8_saturating_scale(ref)
    out, _ = rms_norm(x, norm.weight, EPS, residual=residual, fp8_scale=scale)
    plain, _ = rms_norm(x, norm.weight, EPS, residual=residual)
    return also(within_ulps(out, quantize_fp8(ref, scale), 1), exact(out, quantize_fp8(plain, scale)))


def check_activation(T: int, inter: int, clamped: bool, device: torch.device) -> Measure:
    """SwiGLU / gpt-oss's clamped SwiGLU against the torch module run in float32 and rounded once: within 1 ulp,
    at most 3% of values off (tests/kernels/test_activation.py)."""
    from microscale.kernels.activation import clamped_swiglu, silu_and_mul

    spread = 6.0 if clamped else 3.0
    x = (spread * torch.randn(T, 2 * inter, generator=generator(device, 7), device=device)).to(BF16)
    if clamped:
        out, module = clamped_swiglu(x, GPT_OSS_LIMIT, GPT_OSS_ALPHA), ClampedSwiGLU(GPT_OSS_LIMIT, GPT_OSS_ALPHA)
    else:
        out, module = silu_and_mul(x), SiluAndMul()
    return within_ulps(out, module(x.float()).to(BF16), 1, max_off=0.03)


def check_swiglu_fp8(T: int, inter: int, device: torch.device) -> Measure:
    """FP8-emitting SwiGLU: exactly quantize_fp8 of its own 16-bit output, within 1 FP8 ulp of torch's."""
    from microscale.kernels.activation import silu_and_mul

    if reason := fp8_unavailable(device):
        raise Skip(reason)
    x = (4 * torch.randn(T, 2 * inter, generator=generator(device, 8), device=device)).to(BF16)
    ref = SiluAndMul()(x)
    scale = fp8_saturating_scale(ref)
    out = silu_and_mul(x, fp8_scale=scale)
    return also(within_ulps(out, quantize_fp8(ref, scale), 1), exact(out, quantize_fp8(silu_and_mul(x), scale)))


def mxfp4_weight(n: int, k: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed MXFP4 weights whose 32-blocks are scaled by 2^[-4, 4]: scales vary along rows and across them."""
    gen = generator(device, seed)
    block_exp = torch.randint(-4, 5, (n, k // 32, 1), generator=gen, device=device).float()
    w = torch.randn(n, k // 32, 32, generator=gen, device=device) * torch.exp2(block_exp)
    return pack_mxfp4(w.reshape(n, k))


def check_mxfp4_gemm(m: int, n: int, k: int, device: torch.device) -> Measure:
    """W4A16 MXFP4 GEMM against F.linear on the dequantised weights; per element 1e-2 x (|x| @ |W|^T) (test's)."""
    from microscale.kernels.mxfp4_gemm import mxfp4_linear

    blocks, scales = mxfp4_weight(n, k, device, seed=9)
    x = torch.randn(m, k, generator=generator(device, 10), device=device).to(BF16)
    weight = unpack_mxfp4(blocks, scales, BF16)
    bound = x.float().abs() @ weight.float().abs().t()
    return within(mxfp4_linear(x, blocks, scales), F.linear(x, weight), 1e-2 * bound.double() + 1e-30,
                  "1e-2 x (|x| @ |W|^T)")


def fp8_operands(m: int, n: int, k: int, per_token: bool, device: torch.device, seed: int):
    """fp8-dynamic's operands (per-token activation, per-channel weight scales) or static FP8's (per tensor)."""
    gen = generator(device, seed)
    x = 3 * torch.randn(m, k, generator=gen, device=device)
    w = 0.05 * torch.randn(n, k, generator=gen, device=device)
    x_scale = fp8_scale(x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax())
    w_scale = fp8_scale(w.abs().amax(dim=1) if per_token else w.abs().amax())
    w_q = quantize_fp8(w, w_scale.reshape(-1, 1) if per_token else w_scale)
    return quantize_fp8(x, x_scale), x_scale, w_q, w_scale


def check_fp8_gemm(m: int, n: int, k: int, per_token: bool, device: torch.device) -> Measure:
    """Triton FP8 GEMM against fp8_matmul_reference, within 3 x 2^-8 of the output's scale (the reference rounds to
    bfloat16 three times, the kernel once; tests/kernels/test_fp8_gemm.py)."""
    from microscale.kernels.fp8_gemm import fp8_gemm

    if reason := fp8_unavailable(device):
        raise Skip(reason)
    operands = fp8_operands(m, n, k, per_token, device, seed=11)
    ref = fp8_matmul_reference(*operands, None, BF16)
    return within(fp8_gemm(*operands, None, BF16), ref, 3 * 2**-8 * ref.float().abs().max().item(),
                  "3*2^-8 x max|ref|")


def moe_layer(sizes: Sizes, mxfp4: bool, clamped: bool, device: torch.device) -> FusedMoE:
    E, top_k, H, inter = sizes.moe
    gen = generator(device, 12)
    activation = ClampedSwiGLU(GPT_OSS_LIMIT, GPT_OSS_ALPHA) if clamped else SiluAndMul()
    with torch.device(device):
        layer = FusedMoE(E, top_k, H, inter, clamped, BF16, activation, Mxfp4ExpertsMethod() if mxfp4 else None)
    # Pre-activations of std ~2.5 for unit inputs: gpt-oss's clamp (7) bites now and then.
    weights = {"w13": 2.5 * torch.randn(E, 2 * inter, H, generator=gen, device=device) / H**0.5,
               "w2": torch.randn(E, H, inter, generator=gen, device=device) / inter**0.5}
    for name, w in weights.items():
        if mxfp4:
            layer.quant_method.load_weight(layer, name, w)  # packs with pack_mxfp4
        else:
            getattr(layer, name).data.copy_(w)
    if clamped:  # gpt-oss's experts have biases
        layer.w13_bias.data.copy_(0.5 * torch.randn(E, 2 * inter, generator=gen, device=device))
        layer.w2_bias.data.copy_(0.5 * torch.randn(E, H, generator=gen, device=device))
    return layer


def check_fused_moe(sizes: Sizes, mxfp4: bool, clamped: bool, device: torch.device) -> Measure:
    """The fused MoE (the layer's own Triton dispatch) against FusedMoE's torch path, at each token count: within
    4 bfloat16 ulps of the case's largest output (tests/kernels/test_fused_moe.py)."""
    layer = moe_layer(sizes, mxfp4, clamped, device)
    E, top_k, H, _ = sizes.moe
    measures = []
    for T in sizes.moe_tokens:
        gen = generator(device, 13 + T)
        weights, ids = route_top_k(torch.randn(T, E, generator=gen, device=device), top_k)
        x = torch.randn(T, H, generator=gen, device=device).to(BF16)
        layer.select_kernels("torch", device)
        ref = layer(x, weights, ids)
        layer.select_kernels("triton", device)
        tol = 4 * 2.0**-8
        m = within(layer(x, weights, ids), ref, tol * ref.float().abs().max().item() + tol * ref.double().abs(),
                   "4*2^-8 x (max|ref| + |ref|)")
        measures.append(Measure(m.max_err, m.passed, m.tol, f"T={T}: {m.max_err:.3g}"))
    return Measure(max(m.max_err for m in measures), all(m.passed for m in measures), measures[0].tol,
                   ", ".join(m.detail for m in measures))


def kernel_checks(runner: Runner, sizes: Sizes, device: torch.device) -> None:
    run = runner.run
    for shape in sizes.attention:
        for kv in KV_KINDS:
            label = f"{shape.name} h{shape.heads}/kv{shape.kv_heads}/d{shape.head_dim}" + (
                f" window {shape.window} + sinks" if shape.window else "") + f", KV {kv}"
            run("kernels", f"decode attention {label}",
                lambda s=shape, kv=kv: check_decode_attention(sizes, s, kv, device))
            run("kernels", f"prefill attention {label}",
                lambda s=shape, kv=kv: check_prefill_attention(sizes, s, kv, device))
    for kv in KV_KINDS:
        run("kernels", f"KV cache write, KV {kv}", lambda kv=kv: check_kv_cache_write(sizes, kv, device))
    T = sizes.tokens
    run("kernels", f"add + RMSNorm {T}x{sizes.hidden}", lambda: check_rms_norm(T, sizes.hidden, False, device))
    run("kernels", f"add + RMSNorm {T}x{sizes.oss_hidden} float32 weight",
        lambda: check_rms_norm(T, sizes.oss_hidden, True, device))
    run("kernels", f"add + RMSNorm -> FP8 {T}x{sizes.hidden}", lambda: check_rms_norm_fp8(T, sizes.hidden, device))
    run("kernels", f"SwiGLU {T}x{sizes.inter}", lambda: check_activation(T, sizes.inter, False, device))
    run("kernels", f"clamped SwiGLU {T}x{sizes.oss_inter}", lambda: check_activation(T, sizes.oss_inter, True, device))
    run("kernels", f"SwiGLU -> FP8 {T}x{sizes.inter}", lambda: check_swiglu_fp8(T, sizes.inter, device))
    n, k = sizes.gemm
    for m in sizes.gemm_ms:
        run("kernels", f"MXFP4 GEMM M={m} N={n} K={k}", lambda m=m: check_mxfp4_gemm(m, n, k, device))
        for per_token, scales in ((True, "per-token x per-channel"), (False, "per-tensor")):
            run("kernels", f"FP8 GEMM {scales} M={m} N={n} K={k}",
                lambda m=m, p=per_token: check_fp8_gemm(m, n, k, p, device))
    E, top_k, H, inter = sizes.moe
    for mxfp4, clamped in ((False, True), (True, True), (False, False)):
        experts = "MXFP4" if mxfp4 else "bf16"
        act = "clamped SwiGLU + bias" if clamped else "SwiGLU"
        run("kernels", f"fused MoE {experts} experts, {act}, E={E} top-{top_k} H={H} I={inter}",
            lambda x=mxfp4, c=clamped: check_fused_moe(sizes, x, c, device))


# ---- (b) end to end -----------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8], [5, 17, 99, 3, 250, 42, 7, 61, 70, 71, 72, 90, 91],
           [61, 70, 71, 72, 90, 91, 5, 17, 99, 3, 250, 42]]
TINY_SHAPE = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=4096, max_position_embeddings=512,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
# Largest |logit difference| on a prompt, float32, as tests/kernels/test_triton*_end_to_end.py allow it.
LOGIT_TOL = {"plain": 1e-4, "kv_cache_quant": 5e-2, "quantization": 1e-3}
# A bfloat16 near-tie: the reference's own top-2 logits (magnitudes ~10-30) within two bfloat16 ulps.
BF16_TIE = 0.25
E2E_KNOBS = dict(max_model_len=256, max_num_seqs=4, kv_cache_memory=0.05)


def shrunk_model(config_dir: Path, dst: Path) -> Path:
    """A config-only folder (load_format="dummy") of config_dir's architecture at TINY_SHAPE."""
    cfg = json.loads((config_dir / "config.json").read_text())
    cfg.update(TINY_SHAPE)
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:TINY_SHAPE["num_hidden_layers"]]
    if cfg.get("num_local_experts"):
        cfg.update(num_local_experts=4, num_experts_per_tok=2, experts_per_token=2, sliding_window=8)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


@dataclass
class E2ECase:
    arch: str
    model: dict  # LLM arguments naming the model
    extra: dict = field(default_factory=dict)  # quantization knobs

    @property
    def name(self) -> str:
        return " ".join([self.arch, *(f"{k}={v}" for k, v in self.extra.items())])


def e2e_cases(tmp: Path, quantized: bool) -> list[E2ECase]:
    llama, oss = {"model": str(TINY_LLAMA)}, {"model": str(TINY_GPTOSS)}
    qwen3 = {"model": str(shrunk_model(CONFIGS / "Qwen3-0.6B", tmp / "qwen3")), "load_format": "dummy",
             "tokenizer": str(TINY_LLAMA)}
    cases = [E2ECase("llama", llama), E2ECase("qwen3", qwen3), E2ECase("gpt_oss", oss)]
    if quantized:
        cases += [E2ECase("llama", llama, {"quantization": "mxfp4"}),
                  E2ECase("llama", llama, {"quantization": "fp8-dynamic"}),
                  E2ECase("gpt_oss", oss, {"quantization": "mxfp4"}),
                  E2ECase("llama", llama, {"kv_cache_quant": "int8"}),
                  E2ECase("llama", llama, {"kv_cache_quant": "int4"}),
                  E2ECase("llama", llama, {"kv_cache_quant": "fp8"})]
    return cases


def greedy_tokens(llm: LLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]


@dataclass
class Reference:
    llm: LLM
    tokens: list[list[int]]
    logits: torch.Tensor


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def token_verdict(ref: Reference, prompts: list[list[int]], tokens: list[list[int]], tie: float) -> tuple[bool, str]:
    """Equal tokens, or every prompt's first difference at a near-tie of the reference's own logits (its token and
    the Triton path's within `tie`); later tokens then follow other contexts and are not compared."""
    equal = sum(a == b for r, g in zip(ref.tokens, tokens) for a, b in zip(r, g))
    notes, ok = [f"{equal}/{sum(map(len, ref.tokens))} tokens equal"], True
    for p, (prompt, r, g) in enumerate(zip(prompts, ref.tokens, tokens)):
        i = first_difference(r, g)
        if i is None:
            continue
        logits = ref.llm.engine.prompt_logits(prompt + r[:i])[-1]
        gap = (logits[r[i]] - logits[g[i]]).item()
        ok &= gap <= tie
        notes.append(f"prompt {p} differs at token {i}, reference gap {gap:.3g} ({'<=' if gap <= tie else '>'} "
                     f"{tie:g})")
    return ok, "; ".join(notes)


def e2e_row(case: E2ECase, dtype: str, graphs: bool, refs: dict, sizes: Sizes) -> dict:
    """The Triton backend (eager, or with decode CUDA graphs) against the torch backend, greedy."""
    prompts = PROMPTS[:sizes.e2e_prompts]
    logit_ids = PROMPTS[2] * (1 if sizes is TINY else 3)
    knobs = {**case.model, **case.extra, **E2E_KNOBS, "dtype": dtype}
    if "ref" not in refs:  # built once for the case and dtype, shared by its variants
        llm = LLM(kernel_backend="torch", enforce_eager=True, **knobs)
        refs["ref"] = Reference(llm, greedy_tokens(llm, prompts, sizes.e2e_tokens),
                                llm.engine.prompt_logits(logit_ids))
    ref = refs["ref"]
    llm = LLM(kernel_backend="triton", enforce_eager=not graphs, **knobs)
    if graphs and llm.engine.runner.decode_graphs is None:
        reason = llm.engine.runner.graphs_unavailable_reason()
        return {"status": "fail", "detail": f"no decode graphs captured: {reason}"}
    logit_err = (ref.logits - llm.engine.prompt_logits(logit_ids)).abs().max().item()
    kind = next(iter(case.extra), "plain")
    logit_tol = LOGIT_TOL[kind] if dtype == "float32" else None
    tokens_ok, detail = token_verdict(ref, prompts, greedy_tokens(llm, prompts, sizes.e2e_tokens),
                                      logit_tol if logit_tol is not None else BF16_TIE)
    passed = tokens_ok and (logit_tol is None or logit_err <= logit_tol)
    if graphs:
        detail += f"; graphs captured in {llm.engine.graph_capture_seconds:.1f}s"
    return {"status": "pass" if passed else "fail", "max_err": logit_err,
            "tol": f"logits {logit_tol:g}" if logit_tol is not None else "tokens (near-ties allowed)", "detail": detail}


def e2e_checks(runner: Runner, sizes: Sizes, device: torch.device, tmp: Path) -> None:
    full = device.type == "cuda" and sizes is FULL
    dtypes = ("float32", "bfloat16") if full else ("float32",)
    variants = (False, True) if device.type == "cuda" else (False,)
    for case in e2e_cases(tmp, quantized=full):
        for dtype in dtypes:
            refs: dict = {}
            for graphs in variants:
                name = f"{case.name} {dtype} triton {'graphs' if graphs else 'eager'} vs torch"
                runner.run("e2e", name, lambda c=case, d=dtype, g=graphs, r=refs: e2e_row(c, d, g, r, sizes))
            refs.clear()
            release_memory()


# ---- (c) performance ----------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Kernel time: on a GPU Triton's do_bench (CUDA events, L2 flushed before each call, median); elsewhere one
    warm-up and one timed call (meaningless under the interpreter: plumbing only)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def roofline(seconds: float, bytes_read: float, bandwidth: float | None) -> dict:
    """Achieved GB/s of bytes_read in `seconds`, and its share of the measured HBM bandwidth."""
    gbps = bytes_read / seconds / 1e9
    return {"gbps": gbps, "roofline_pct": 100 * gbps / bandwidth if bandwidth else None}


def measure_bandwidth(sizes: Sizes, device: torch.device) -> dict:
    src = torch.ones(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    gbps = 2 * sizes.copy_bytes / (ms / 1e3) / 1e9  # each byte read once and written once
    return {"status": "ok", "ms": ms, "gbps": gbps, "roofline_pct": 100.0,
            "detail": f"{size_text(sizes.copy_bytes)} copied, read + write"}


def decode_attention_perf(sizes: Sizes, kv: str, device: torch.device, bandwidth: float | None) -> dict:
    from microscale.kernels.decode_attention import choose_num_splits, paged_decode_attention

    shape, batch, ctx = sizes.attention[0], sizes.attn_batch, sizes.attn_context
    case = paged_case([(ctx - 1, 1)] * batch, shape, kv, sizes.block_size, device, seed=14)
    q, _, scale = attention_inputs(batch, shape, device, seed=15)
    ops = case.cache.kernel_operands()
    splits = choose_num_splits(ctx, batch, shape.kv_heads)  # fixed outside the timing, as under CUDA graphs
    ms = time_ms(lambda: paged_decode_attention(q, ops.keys, ops.values, case.tables, case.context_lens, scale,
                                                k_scale=ops.k_scale, v_scale=ops.v_scale, num_splits=splits,
                                                k_zero=ops.k_zero, v_zero=ops.v_zero), device)
    bytes_read = batch * ctx * case.cache.bytes_per_token()  # keys, values and any per-token scales
    return {"status": "ok", "ms": ms, **roofline(ms / 1e3, bytes_read, bandwidth),
            "detail": f"{size_text(bytes_read)} of K/V per layer, {splits} splits"}


def gemm_perf(proj: str, n: int, k: int, m: int, device: torch.device, bandwidth: float | None) -> dict:
    """bf16 cuBLAS (torch.matmul) against the MXFP4 GEMM, the Triton FP8 GEMM and cuBLAS FP8 (row-wise
    torch._scaled_mm) on one projection; FP8 operands as fp8-dynamic has them (per-token x per-channel scales;
    activation quantisation not timed). One GEMM failing leaves the others in the row."""
    from microscale.kernels.fp8_gemm import fp8_gemm
    from microscale.kernels.mxfp4_gemm import mxfp4_linear

    gen = generator(device, 16)
    x = torch.randn(m, k, generator=gen, device=device).to(BF16)
    w = (0.02 * torch.randn(n, k, generator=gen, device=device)).to(BF16)
    blocks, scales = pack_mxfp4(w)
    fp8 = fp8_operands(m, n, k, True, device, seed=17)
    fp8_reason = fp8_unavailable(device)
    impls = {  # name: (call, weight bytes, why it cannot run here)
        "bf16": (lambda: torch.matmul(x, w.t()), n * k * 2, None),
        "mxfp4": (lambda: mxfp4_linear(x, blocks, scales), blocks.numel() + scales.numel(), None),
        "fp8_triton": (lambda: fp8_gemm(*fp8, None, BF16), n * k + 4 * n, fp8_reason),
        "fp8_scaled_mm": (lambda: scaled_mm_rowwise(*fp8, None, BF16), n * k + 4 * n,
                          fp8_reason or (None if device.type == "cuda" else "torch._scaled_mm needs CUDA")),
    }
    row: dict = {"status": "ok", "proj": proj, "M": m, "N": n, "K": k}
    for impl, (fn, weight_bytes, reason) in impls.items():
        row[f"{impl}_ms"] = None
        if reason:
            row[f"{impl}_note"] = reason
            continue
        try:
            row[f"{impl}_ms"] = ms = time_ms(fn, device)
        except Exception as error:
            row["status"] = "error"
            row[f"{impl}_note"] = f"{type(error).__name__}: {error}"
            continue
        if m <= 16:  # decode-sized M: the weight stream is the cost
            row[f"{impl}_roofline_pct"] = roofline(ms / 1e3, weight_bytes, bandwidth)["roofline_pct"]
    return row


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a layer runs for `batch` tokens routed uniformly at random: E (1 - (1 - k/E)^B)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def weight_bytes_per_step(llm: LLM, batch: int) -> float:
    """Weight bytes one decode step reads: every parameter at its stored precision, except the embedding table
    (a gather of `batch` rows; read whole only when it is the LM head too) and, for MoE layers, only the experts
    routed (expected_experts of them)."""
    model, cfg = llm.engine.runner.model, llm.engine.model_config
    share = {}
    for module in model.modules():
        if isinstance(module, FusedMoE):
            fraction = expected_experts(module.num_experts, module.top_k, batch) / module.num_experts
            share.update({id(p): fraction for p in module.parameters()})
    total = 0.0
    for name, param in model.named_parameters():
        if "embed_tokens" in name and not cfg.tie_word_embeddings:
            continue
        total += param.numel() * param.element_size() * share.get(id(param), 1.0)
    return total


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Token ids below the bundled tokenizer's vocabulary (the dummy models use it)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 4000, (count, length), generator=gen).tolist()


def load_perf_model(holder: dict, model_dir: Path, extra: dict, sizes: Sizes) -> dict:
    start = time.perf_counter()
    llm = LLM(str(model_dir), tokenizer=str(TINY_LLAMA), load_format="dummy", dtype="bfloat16",
              max_model_len=sizes.max_model_len, max_num_seqs=max(sizes.batches), kv_cache_memory=sizes.kv_gib,
              enable_prefix_caching=False, **extra)  # no prefix hits: both timed runs prefill alike
    holder["llm"] = llm
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    graphs = llm.engine.graph_capture_seconds
    return {"status": "ok", "ms": seconds * 1e3, "detail": f"{size_text(weights)} of weights; " + (
        f"decode graphs captured in {graphs:.1f}s" if graphs is not None else "no CUDA graphs (eager)")}


def decode_perf(llm: LLM, batch: int, sizes: Sizes, bandwidth: float | None) -> dict:
    tok_s = decode_tokens_per_s(llm, random_prompts(batch, sizes.prompt_len, seed=batch), sizes.new_tokens)
    step = batch / tok_s
    bytes_read = weight_bytes_per_step(llm, batch)
    return {"status": "ok", "ms": step * 1e3, "throughput": tok_s, "unit": "tok/s",
            **roofline(step, bytes_read, bandwidth),
            "detail": f"{size_text(bytes_read)} of weights per step; prompts of {sizes.prompt_len}"}


def offline_perf(llm: LLM, sizes: Sizes, bandwidth: float | None) -> dict:
    batch, input_len, output_len = sizes.offline
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in random_prompts(batch, input_len, seed=0)]
    start = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    step = elapsed / output_len
    return {"status": "ok", "ms": step * 1e3, "throughput": batch * output_len / elapsed, "unit": "output tok/s",
            **roofline(step, weight_bytes_per_step(llm, batch), bandwidth),
            "detail": f"{elapsed:.2f}s in all; the step time includes the prefill of {batch}x{input_len} tokens"}


def model_perf(runner: Runner, label: str, model_dir: Path, extra: dict, sizes: Sizes, bandwidth: float | None,
               offline: bool = False) -> None:
    holder: dict = {}
    runner.run("perf", f"{label}: load + graph capture", lambda: load_perf_model(holder, model_dir, extra, sizes))
    if "llm" in holder:
        for batch in sizes.batches:
            runner.run("perf", f"{label} decode, batch {batch}",
                       lambda b=batch: decode_perf(holder["llm"], b, sizes, bandwidth))
        if offline:
            b, i, o = sizes.offline
            runner.run("perf", f"{label} offline batch {b}, input {i}, output {o}",
                       lambda: offline_perf(holder["llm"], sizes, bandwidth))
    holder.clear()
    release_memory()


def perf(runner: Runner, sizes: Sizes, device: torch.device, tmp: Path) -> None:
    bw = runner.run("perf", "HBM bandwidth (device-to-device copy)", lambda: measure_bandwidth(sizes, device))
    bandwidth = bw.get("gbps") if bw else None
    shape = sizes.attention[0]
    for kv in ("none", "int8", "int4", "fp8"):
        runner.run("perf", f"decode attention {shape.name}, batch {sizes.attn_batch} x {sizes.attn_context}, KV {kv}",
                   lambda kv=kv: decode_attention_perf(sizes, kv, device, bandwidth))
    for proj, n, k in sizes.gemm_shapes:
        for m in sizes.perf_ms:
            runner.run("gemm", f"GEMM {proj} {n}x{k} M={m}",
                       lambda p=proj, n=n, k=k, m=m: gemm_perf(p, n, k, m, device, bandwidth))
    llama, oss = CONFIGS / "Llama-3.1-8B", CONFIGS / "gpt-oss-20b"
    if sizes.shrink_models:
        llama, oss = shrunk_model(llama, tmp / "llama-8b-shape"), shrunk_model(oss, tmp / "gpt-oss-20b-shape")
    suffix = " (shrunk)" if sizes.shrink_models else ""
    for scheme, extra in (("bf16", {}), ("fp8-dynamic", {"quantization": "fp8-dynamic"}),
                          ("fp8 static (dummy scales)", {"quantization": "fp8"}), ("mxfp4", {"quantization": "mxfp4"})):
        model_perf(runner, f"Llama-3.1-8B{suffix} {scheme}", llama, extra, sizes, bandwidth)
    model_perf(runner, f"gpt-oss-20b{suffix} mxfp4", oss, {}, sizes, bandwidth, offline=True)


# ---- report -------------------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def environment(device: torch.device, args: argparse.Namespace, argv: list[str]) -> dict:
    """microscale bench's environment record, with this run's own keys."""
    env = report.environment()
    versions = env["versions"]
    return {
        **env,
        "device": env["gpu"] or f"CPU ({env['cpu']}, {env['cpu_count']} cores), no GPU",
        "torch": versions["torch"], "triton": versions.get("triton"), "cuda": torch.version.cuda,
        "python": versions["python"], "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": args.dry_run, "quick": args.quick, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "command": " ".join(["python", "benchmarks/gpu_check.py", *argv]),
    }


def summarize(rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def json_safe(value):
    """NaN and infinities as strings: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(x) + " |" for x in lines)]


def gemm_cell(row: dict, impl: str) -> str:
    ms, bf16 = row.get(f"{impl}_ms"), row.get("bf16_ms")
    if ms is None:
        return f"n/a ({row.get(f'{impl}_note', '')[:80]})"
    cell = f"{ms:.4g}" + (f" ({bf16 / ms:.2f}×)" if impl != "bf16" and bf16 else "")
    pct = row.get(f"{impl}_roofline_pct")
    return cell + (f", {pct:.0f}%" if pct is not None else "")


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    by = {s: [r for r in rows if r["section"] == s] for s in ("kernels", "e2e", "perf", "gemm")}
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result["summary"].items()))
    out = [f"## GPU check: {meta['device']}, {meta['date'][:10]}, commit {meta['git_commit']}", "",
           f"torch {meta['torch']}, Triton {meta['triton']}, CUDA {meta['cuda']}; `{meta['command']}`; "
           f"{counts}; {meta['seconds']:.0f}s in all."]
    if meta["interpreter"] or meta["dry_run"]:
        out += ["", "**Dry run" + (" on CPU through Triton's interpreter" if meta["interpreter"] else "")
                + ": tiny shapes and stand-in models; every timing below is meaningless (plumbing only).**"]
    if by["kernels"]:
        out += ["", "### Kernels: Triton vs torch reference", ""]
        out += table(["check", "result", "max error", "criterion", "note"], [
            [r["name"], r["status"], fmt(r.get("max_err")), r.get("tol", ""), r.get("detail", "")]
            for r in by["kernels"]])
    if by["e2e"]:
        out += ["", "### End to end: greedy tokens, Triton vs torch kernel backends", ""]
        out += table(["case", "result", "max Δ prompt logit", "criterion", "note"], [
            [r["name"], r["status"], fmt(r.get("max_err")), r.get("tol", ""), r.get("detail", "")] for r in by["e2e"]])
    if by["perf"]:
        out += ["", "### Bandwidth, decode attention, decode throughput (roofline: bytes read / time / measured HBM "
                "bandwidth)", ""]
        out += table(["measurement", "result", "time (ms)", "throughput", "GB/s", "% of roofline", "note"], [
            [r["name"], r["status"], fmt(r.get("ms"), ".4g"),
             f"{fmt(r.get('throughput'), '.4g')} {r['unit']}" if r.get("unit") else "–",
             fmt(r.get("gbps"), ".4g"), fmt(r.get("roofline_pct"), ".1f"), r.get("detail", "")] for r in by["perf"]])
    if by["gemm"]:
        out += ["", "### GEMMs, bf16 activations: ms (speed-up vs bf16 cuBLAS), % of weight-bytes roofline at M ≤ 16",
                ""]
        out += table(["projection N×K", "M", "bf16 cuBLAS", "MXFP4 (Triton)", "FP8 (Triton)", "FP8 (cuBLAS)"], [
            [f"{r['proj']} {r['N']}×{r['K']}", str(r["M"]), *(gemm_cell(r, i) for i in
                                                              ("bf16", "mxfp4", "fp8_triton", "fp8_scaled_mm"))]
            if "proj" in r else [r["name"], "", r["status"], r.get("detail", ""), "", ""] for r in by["gemm"]])
    return "\n".join(out)


# ---- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default benchmarks/results/gpu-check.json; gpu-check-dry-run.json for a dry "
                        "run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and stand-in models (checks the plumbing)")
    p.add_argument("--dry-run", action="store_true",
                   help="run without a GPU: kernels through Triton's interpreter, tiny shapes; implies --quick")
    p.add_argument("--skip-kernels", action="store_true", help="skip (a), the kernel checks")
    p.add_argument("--skip-e2e", action="store_true", help="skip (b), the end-to-end greedy checks")
    p.add_argument("--skip-perf", action="store_true", help="skip (c), the performance table")
    p.add_argument("--only", metavar="TEXT", help="run only the rows whose name contains TEXT (case-insensitive)")
    p.add_argument("--verbose", action="store_true", help="microscale's INFO logs (kernel choices, KV cache, graphs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        if not args.dry_run:
            print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False). Run it on a GPU host, or pass "
                  "--dry-run to run its CPU-capable parts through Triton's interpreter.", file=sys.stderr)
            return 2
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"  # read when Triton defines each kernel: before any is imported
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.quick or args.dry_run else FULL
    out = args.out or REPO / "benchmarks" / "results" / ("gpu-check-dry-run.json" if args.dry_run else
                                                          "gpu-check.json")
    runner, started = Runner(args.only), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if not args.skip_kernels:
            kernel_checks(runner, sizes, device)
        if not args.skip_e2e:
            e2e_checks(runner, sizes, device, Path(tmp))
        if not args.skip_perf:
            perf(runner, sizes, device, Path(tmp))
    result = {"meta": {**environment(device, args, argv), "seconds": time.perf_counter() - started},
              "summary": summarize(runner.rows), "rows": runner.rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    print(f"gpu_check: {len(runner.rows)} rows written to {out}", file=sys.stderr)
    print(markdown(result))
    return 1 if any(r["status"] in ("fail", "error") for r in runner.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
