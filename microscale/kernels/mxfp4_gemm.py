"""MXFP4 weight-only GEMM (W4A16): y = x @ W^T + bias with W [N, K] kept packed as MXFP4 `blocks` [N, K/32, 16]
and `scales` [N, K/32] (see quant/mxfp4.py), dequantised in registers and never materialised.

Matches `F.linear(x, unpack_mxfp4(blocks, scales, x.dtype), bias)`: every weight is dequantised to float32
(exact, but Inf past 2^128, as unpack_mxfp4 gives too), then rounded to float16 for float16 activations as
unpack_mxfp4 does (0 / subnormals / Inf outside its range; exact for bfloat16), and products are summed in
float32. Scale byte 0xFF makes its block NaN.

A byte holds elements 2j (low nibble) and 2j + 1 (high): rather than interleave the nibbles, both kernels split
each K tile into its even and odd elements and pair them with x's even and odd columns (a dot sums over K in
any order). Two variants, chosen by M (`choose_variant`):
- decode (M <= DECODE_MAX_M): bandwidth-bound GEMV. Each program owns BLOCK_N weight rows and a slice of K
  (split-K, so that a few rows still fill the GPU), reads each weight byte once and reduces with float32 FMAs;
  split-K partials are summed in float32 by a second small kernel, which adds the bias.
- prefill: tiled tl.dot GEMM, BLOCK_K a multiple of 32 so a tile spans whole scale groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.mx_format import MXFP4_BLOCK
from microscale.kernels.rounding import round_to, rounding_of
from microscale.kernels.selector import interpreting

# Under the interpreter tl.dot on bfloat16 operands multiplies raw bit patterns: upcast to float32 there.
_INTERPRET = interpreting()  # read once: kernels are defined (and their constexprs fixed) at import

# Largest M served by the decode (GEMV) variant; module-level so tests can force either variant.
DECODE_MAX_M = 16
# Decode programs aimed for: enough to fill an H100's 132 SMs twice over through split-K.
_TARGET_PROGRAMS = 264
# Elements of the decode kernel's [BLOCK_M, BLOCK_N, BLOCK_K / 2] product tile: ~64 float32 registers a thread.
_DECODE_TILE = 8192


def choose_variant(m: int) -> str:
    """'decode' (split-K GEMV) for up to DECODE_MAX_M rows, else 'prefill' (tiled tl.dot)."""
    return "decode" if m <= DECODE_MAX_M else "prefill"


@triton.jit
def _dequant(byte, s):
    """int32 `byte` (two E2M1 codes) and int32 scale byte `s` -> (low, high) nibble values, float32, exact."""
    scale = tl.where(s == 0, 1 << 22, s << 23).to(tl.float32, bitcast=True)  # 2^(s-127); 2^-127 is subnormal
    scale = tl.where(s == 255, float("nan"), scale)  # E8M0 NaN: the whole block
    lo = _e2m1(byte & 15) * scale
    hi = _e2m1((byte >> 4) & 15) * scale
    return lo, hi


@triton.jit
def _e2m1(code):
    """E2M1 code (int32, 0..15) -> float32, built from its bits: codes 2..7 are (1 + m/2) * 2^(e-1) with
    e = bits 1-2 and m = bit 0; codes 0 and 1 (0 and 0.5) are the subnormals; bit 3 is the sign."""
    c = code & 7
    m = c & 1
    bits = tl.where(c < 2, m * (126 << 23), (((c >> 1) + 126) << 23) | (m << 22))
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _rounded(acc, ROUNDING: tl.constexpr, DTYPE: tl.constexpr):
    """float32 `acc` rounded (ties to even) and cast to the output dtype."""
    acc = round_to(acc, ROUNDING)
    if ROUNDING == 1:
        # Already a bfloat16 value: keep its top 16 bits. The interpreter's cast would flush subnormals to 0.
        return (acc.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return acc.to(DTYPE)


@triton.jit
def _decode_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_bn, stride_sn, stride_om, stride_on, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ROUNDING: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    j = tl.arange(0, BLOCK_K // 2)  # byte of the tile; holds elements 2j and 2j + 1

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ke = k0 + 2 * j  # K is a multiple of 32: ke < K iff ke + 1 < K
        k_ok = ke < k_hi
        w_ok = n_ok[:, None] & k_ok[None, :]
        byte = tl.load(blocks_ptr + rn64[:, None] * stride_bn + (ke // 2)[None, :], mask=w_ok, other=0)
        s = tl.load(scales_ptr + rn64[:, None] * stride_sn + (ke // 32)[None, :], mask=w_ok, other=127)
        w_lo, w_hi = _dequant(byte.to(tl.int32), s.to(tl.int32))
        if ROUNDING == 2:
            # Through float16, as unpack_mxfp4 gives them: rounds to 0 / subnormals / Inf out of its range. The
            # float32 values are exact in bfloat16 (whose cast, in the interpreter, flushes subnormals).
            w_lo = w_lo.to(tl.float16).to(tl.float32)
            w_hi = w_hi.to(tl.float16).to(tl.float32)
        x_off = x_ptr + rm64[:, None] * stride_xm + ke[None, :] * stride_xk
        x_ok = m_ok[:, None] & k_ok[None, :]
        x_even = tl.load(x_off, mask=x_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_off + stride_xk, mask=x_ok, other=0.0).to(tl.float32)
        acc += tl.sum(x_even[:, None, :] * w_lo[None, :, :], 2)
        acc += tl.sum(x_odd[:, None, :] * w_hi[None, :, :], 2)

    o_ok = m_ok[:, None] & n_ok[None, :]
    o_off = rm64[:, None] * stride_om + rn64[None, :] * stride_on
    if SPLIT:
        # float32 partial sums [split, M, N]; _reduce_kernel adds them up with the bias.
        tl.store(out_ptr + pid_s * stride_os + o_off, acc, mask=o_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_off, _rounded(acc, ROUNDING, out_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _reduce_kernel(
    part_ptr, bias_ptr, out_ptr, MN, N, splits,
    HAS_BIAS: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _rounded(acc, ROUNDING, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _prefill_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_bn, stride_sn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROUNDING: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks sweep the N tiles together, so their weight tiles are reused from L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = rn < N
    m_ok = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    j = tl.arange(0, BLOCK_K // 2)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ke = k0 + 2 * j
        k_ok = ke < K
        # Weights loaded as W^T tiles [BLOCK_K / 2, BLOCK_N], ready for the dot.
        w_ok = k_ok[:, None] & n_ok[None, :]
        byte = tl.load(blocks_ptr + rn64[None, :] * stride_bn + (ke // 2)[:, None], mask=w_ok, other=0)
        s = tl.load(scales_ptr + rn64[None, :] * stride_sn + (ke // 32)[:, None], mask=w_ok, other=127)
        w_lo, w_hi = _dequant(byte.to(tl.int32), s.to(tl.int32))
        if DOT_F32:
            # Interpreter: float32 operands. float16 weights still round through float16 (see _decode_kernel).
            if ROUNDING == 2:
                w_lo = w_lo.to(tl.float16).to(tl.float32)
                w_hi = w_hi.to(tl.float16).to(tl.float32)
        else:
            w_lo = w_lo.to(x_ptr.dtype.element_ty)
            w_hi = w_hi.to(x_ptr.dtype.element_ty)
        x_off = x_ptr + rm64[:, None] * stride_xm + ke[None, :] * stride_xk
        x_ok = m_ok[:, None] & k_ok[None, :]
        x_even = tl.load(x_off, mask=x_ok, other=0.0)
        x_odd = tl.load(x_off + stride_xk, mask=x_ok, other=0.0)
        if DOT_F32:
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
        acc = tl.dot(x_even, w_lo, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd, w_hi, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on,
        _rounded(acc, ROUNDING, out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :],
    )


def _decode(x, blocks, scales, bias, out, rounding) -> None:
    M, K = x.shape
    N = out.shape[1]
    block_m = min(16, triton.next_power_of_2(M))
    block_n = 64 if block_m <= 4 else 32
    # Fewer rows, longer K tiles: the product tile stays at _DECODE_TILE elements.
    block_k = 2 * min(128, max(16, _DECODE_TILE // (block_m * block_n)))
    n_tiles, m_tiles, k_tiles = triton.cdiv(N, block_n), triton.cdiv(M, block_m), triton.cdiv(K, block_k)
    split = min(k_tiles, max(1, triton.cdiv(_TARGET_PROGRAMS, n_tiles * m_tiles)))
    k_per_split = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(K, k_per_split)  # no empty slices
    has_bias = bias is not None
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    _decode_kernel[(n_tiles, split, m_tiles)](
        x, blocks, scales, bias if has_bias else out, target,
        M, N, K, k_per_split,
        x.stride(0), x.stride(1), blocks.stride(0), scales.stride(0),
        target.stride(-2), target.stride(-1), target.stride(0) if split > 1 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=has_bias, SPLIT=split > 1, ROUNDING=rounding,
    )
    if split > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(M * N, block),)](
            target, bias if has_bias else out, out, M * N, N, split,
            HAS_BIAS=has_bias, ROUNDING=rounding, BLOCK=block,
        )


def _prefill(x, blocks, scales, bias, out, rounding) -> None:
    M, K = x.shape
    N = out.shape[1]
    block_m = min(64, max(16, triton.next_power_of_2(M)))  # 16: tl.dot's minimum
    # 64-deep K tiles: at 128 the decoded weight tile spills 240-256 B a thread on sm_90 in 16-bit and ~7 KB in
    # float32 (python -m microscale.kernels.aot.sweep); at 64, 167-185 registers and none.
    block_n, block_k = 64, 64
    has_bias = bias is not None
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _prefill_kernel[grid](
        x, blocks, scales, bias if has_bias else out, out,
        M, N, K,
        x.stride(0), x.stride(1), blocks.stride(0), scales.stride(0), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        HAS_BIAS=has_bias, ROUNDING=rounding,
        # float32 activations get exact float32 products, not TF32's 10-bit mantissas.
        DOT_F32=_INTERPRET, DOT_PRECISION="ieee" if x.dtype == torch.float32 or _INTERPRET else "tf32",
        # 64-row tiles at 4 warps spill ~130 B a thread on sm_80/89 (aot sweep); at 8, none there or on sm_90.
        num_warps=8 if block_m == 64 else 4,
    )


def mxfp4_linear(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] (float32/bfloat16/float16) @ W^T (+ bias) -> [M, N] in x.dtype, for W [N, K] stored as MXFP4
    `blocks` uint8 [N, K/32, 16] and `scales` uint8 [N, K/32]; as F.linear(x, unpack_mxfp4(...), bias)."""
    rounding = rounding_of(x.dtype)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype} / {scales.dtype}.")
    if x.dim() != 2 or blocks.dim() != 3 or blocks.shape[:2] != scales.shape or blocks.shape[2] != 16:
        raise ValueError(
            f"mxfp4_linear takes x [M, K], blocks [N, K/32, 16], scales [N, K/32]; got {tuple(x.shape)}, "
            f"{tuple(blocks.shape)}, {tuple(scales.shape)}."
        )
    M, K = x.shape
    N, groups = scales.shape
    if K != groups * MXFP4_BLOCK:
        raise ValueError(f"x has K = {K} but the weights hold {groups} groups of {MXFP4_BLOCK}.")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}.")
    # Each weight row must be K/2 contiguous bytes (true of the Linear's parameters: no copy).
    if blocks.stride(2) != 1 or blocks.stride(1) != 16:
        blocks = blocks.contiguous()
    if scales.stride(1) != 1:
        scales = scales.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(M, N))
    (_decode if choose_variant(M) == "decode" else _prefill)(x, blocks, scales, bias, out, rounding)
    return out
