"""FP8 (E4M3) GEMM: y = (x_q * x_scale) @ (w_q * w_scale)^T + bias, the Triton counterpart of torch._scaled_mm
for the FP8 Linear layers of microscale.quant.fp8.

One program per BLOCK_M x BLOCK_N output tile, walking K in BLOCK_K steps with tl.dot on the FP8 operands into a
float32 accumulator; the epilogue multiplies by the activation scale (per tensor or per row) and the weight scale
(per tensor or per output column), adds the bias and rounds once to the output dtype. Unlike _scaled_mm it takes
any mix of per-tensor and per-row/column scales and any M, N, K (ragged tiles are masked, the K tail reads zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.rounding import round_to, rounding_of
from microscale.kernels.selector import fp8_unavailable_reason, interpreting

_INTERPRET = interpreting()  # read once: kernels are defined (and their constexprs fixed) at import
def fp8_gemm_unavailable_reason(device: torch.device) -> str | None:
    """None where fp8_gemm can run (a CUDA GPU with FP8 tensor cores, or any device under the interpreter),
    else one line saying why not."""
    return fp8_unavailable_reason(device, "FP8 tl.dot")


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xs, stride_om, stride_on,
    X_PER_ROW: tl.constexpr, W_PER_COL: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    ROUNDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so a weight tile is reused from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0 / column 0 (always valid) instead of masking each load on M and N:
    # their results are never stored. int64: M*K and N*K can pass 2^31 bytes.
    safe_rows = tl.where(row_ok, rows, 0).to(tl.int64)
    safe_cols = tl.where(col_ok, cols, 0).to(tl.int64)
    x_ptrs = x_ptr + safe_rows[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + safe_cols[None, :] * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]: w^T

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            # The K tail reads zeros on both sides, which add nothing.
            a = tl.load(x_ptrs, mask=(k + ks)[None, :] < K, other=0.0)
            b = tl.load(w_ptrs, mask=(k + ks)[:, None] < K, other=0.0)
        # Hopper's FP8 MMA adds into a narrower-than-float32 accumulator, and Triton lets it run the whole K
        # loop there on sm90: fold each BLOCK_K slice into the float32 accumulator, as _scaled_mm (without
        # use_fast_accum) and DeepGEMM do.
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Same order as fp8_matmul's fallback: (acc * x_scale) * w_scale, in float32.
    if X_PER_ROW:
        acc = acc * tl.load(xs_ptr + safe_rows * stride_xs).to(tl.float32)[:, None]
    else:
        acc = acc * tl.load(xs_ptr).to(tl.float32)
    if W_PER_COL:
        acc = acc * tl.load(ws_ptr + safe_cols).to(tl.float32)[None, :]
    else:
        acc = acc * tl.load(ws_ptr).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + safe_cols).to(tl.float32)[None, :]
    # Rounded explicitly (ties to even): the interpreter's float32 -> bfloat16 cast truncates.
    acc = round_to(acc, ROUNDING)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tiles(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). FP8 tl.dot needs K tiles of at least 32 on NVIDIA."""
    if _INTERPRET:
        return 16, 32, 32, 4, 1  # small tiles keep the interpreter's numpy dots cheap and the tests' tails ragged
    if m <= 16:  # decode: the weight stream is the cost; wide N tiles, deep pipeline
        return 16, 128, 128, 4, 4
    if m <= 64:
        return 64, 128, 128, 4, 4
    return 128, 128, 128, 8, 3


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(x_q * x_scale) @ (w_q * w_scale)^T + bias, as microscale.quant.fp8.fp8_matmul_reference.
    x_q: float8_e4m3fn [M, K]; x_scale: [] (per tensor) or [M, 1] (per token); w_q: float8_e4m3fn [N, K];
    w_scale: [] or [1] (per tensor) or [N]; bias: [N] or None. Products are accumulated in float32, scaled and
    biased in float32, and rounded once to out_dtype (float32, bfloat16 or float16). Returns [M, N]."""
    rounding = rounding_of(out_dtype)
    m, k = x_q.shape
    n, k_w = w_q.shape
    if k != k_w:
        raise ValueError(f"fp8_gemm: x_q is [{m}, {k}] but w_q is [{n}, {k_w}]; their K must match.")
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:  # no products: the kernel would store scale * 0 + bias, which is this
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    x_per_row = x_scale.numel() > 1  # as fp8_matmul_reference: one token's [1, 1] scale is a per-tensor one
    w_per_col = w_scale.numel() > 1
    xs = x_scale.reshape(-1)
    ws = w_scale.reshape(-1).contiguous()
    block_m, block_n, block_k, num_warps, num_stages = _tiles(m)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_gemm_kernel[grid](
        x_q, w_q, xs, ws, bias if bias is not None else out, out,
        m, n, k,
        *x_q.stride(), *w_q.stride(), xs.stride(0) if x_per_row else 0, *out.stride(),
        X_PER_ROW=x_per_row, W_PER_COL=w_per_col, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        ROUNDING=rounding, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
