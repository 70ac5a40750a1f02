"""Fused mixture-of-experts: the experts of `FusedMoE` as two grouped GEMMs over the tokens routed to them.

(1) `moe_align` sorts the T * k (token, choice) assignments by expert and pads each expert's run to a multiple of
BLOCK_M rows, so every BLOCK_M row-block belongs to one expert. (2) GEMM 1: each program takes one row-block and
BLOCK_N intermediate columns, gathers its tokens' rows of x, computes the matching gate and up tiles (rows j and
I + j of w13) and applies the gated activation in the epilogue, writing h [padded rows, I]. (3) GEMM 2: h times
w2, scaled by the routing weight, written to the assignment's own row of a [T * k, H] buffer (x's dtype: the
values are already rounded to it); (4) that is summed over k in float32 and cast to x's dtype. No atomics: the
result is deterministic. Everything stays on the device, with shapes fixed by the input shapes (no host sync), so
it can be captured in a CUDA graph.

MXFP4 experts are dequantised tile by tile in registers; no expert is ever written out in full. Rounding follows
the torch oracle: the pre-activations, h, the expert output and its weighted product are each rounded to x's
dtype (with round_to, as the interpreter's bfloat16 cast truncates); the activation itself runs in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.rounding import round_to, rounding_of
from microscale.kernels.selector import interpreting

# Under the interpreter tl.dot on bfloat16 operands multiplies raw bit patterns: upcast to float32 there.
_INTERPRET = interpreting()  # read once: kernels are defined (and their constexprs fixed) at import
_ACTIVATIONS = ("silu", "clamped_swiglu")


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay the assignments (flat index t * k + j of topk_ids [T, k]) out grouped by expert, stable, each expert's
    run starting at a multiple of block_m. Returns (sorted_ids int32 [P], block_expert int32 [P // block_m]):
    padding entries hold T * k; block_expert is -1 for the blocks past the last expert's run. P is fixed by the
    shapes alone, T * k + min(T * k, E) * (block_m - 1) rounded down to a multiple of block_m."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n, device = flat.numel(), flat.device
    # scatter_add_, not bincount: bincount on CUDA reads the max id back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    # Rank of each assignment within its expert, placed after the expert's padded start.
    first = counts.cumsum(0) - counts
    dest = (ends - padded)[sorted_experts] + torch.arange(n, device=device) - first[sorted_experts]
    size = (n + min(n, num_experts) * (block_m - 1)) // block_m * block_m
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    # The expert whose padded run covers each block start: the number of runs ending at or before it.
    block_starts = torch.arange(0, size, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _weight_tile(w_ptr, s_ptr, expert, n, k, mask, stride_we, stride_wn, stride_se, stride_sn,
                 MXFP4: tl.constexpr):
    """W[expert, n, k] as a [BLOCK_K, BLOCK_N] tile (k down, n across): the B operand of x @ W^T. MXFP4 gives
    float32, which the caller casts to the model dtype as the oracle's dequantisation does (exact in bfloat16)."""
    if MXFP4:
        # Rows are flat bytes (a group of 32 codes is 16 contiguous bytes): code k is in byte k // 2.
        byte = tl.load(w_ptr + expert * stride_we + n[None, :] * stride_wn + k[:, None] // 2, mask=mask, other=0)
        code = (byte.to(tl.int32) >> ((k[:, None] % 2) * 4)) & 15
        mag = code & 7
        # E2M1 magnitude as float32 bits: codes 0, 1 are 0 and 0.5; from 2 on, exponent mag // 2 - 1, mantissa
        # bit mag & 1.
        bits = tl.where(mag < 2, mag * (126 << 23), (((mag >> 1) + 126) << 23) | ((mag & 1) << 22))
        value = bits.to(tl.float32, bitcast=True)
        value = tl.where(code >= 8, -value, value)
        s = tl.load(s_ptr + expert * stride_se + n[None, :] * stride_sn + k[:, None] // 32, mask=mask, other=127)
        s = s.to(tl.int32)
        # 2^(s - 127) built from bits: byte 0 is the subnormal 2^-127, 0xFF is NaN.
        sbits = tl.where(s == 0, 1 << 22, s << 23)
        sbits = tl.where(s == 255, 0x7FC00000, sbits)
        w = value * sbits.to(tl.float32, bitcast=True)  # exact
    else:
        w = tl.load(w_ptr + expert * stride_we + n[None, :] * stride_wn + k[:, None], mask=mask, other=0.0)
    return w


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
    num_valid, top_k, hidden, inter, limit, alpha,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_hm,
    CLAMPED: tl.constexpr, HAS_BIAS: tl.constexpr, MXFP4: tl.constexpr, ROUNDING: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # int64 from the start: the compiler rejects an if-block that changes a variable's type (the interpreter
    # does not), and expert * stride_we needs 64 bits for large expert tensors.
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    # Blocks past the last expert's run (the grid is sized for the worst case) have nothing to do.
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + rows)
        row_ok = ids < num_valid
        tokens = (ids // top_k).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            a = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w_gate = _weight_tile(w_ptr, ws_ptr, expert, n, k, w_mask, stride_we, stride_wn, stride_se, stride_sn,
                                  MXFP4).to(x_ptr.dtype.element_ty)
            w_up = _weight_tile(w_ptr, ws_ptr, expert, n + inter, k, w_mask, stride_we, stride_wn, stride_se,
                                stride_sn, MXFP4).to(x_ptr.dtype.element_ty)
            if DOT_F32:
                a = a.to(tl.float32)
                w_gate = w_gate.to(tl.float32)
                w_up = w_up.to(tl.float32)
            acc_gate += tl.dot(a, w_gate, input_precision=DOT_PRECISION)
            acc_up += tl.dot(a, w_up, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc_gate += tl.load(b_ptr + expert * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(b_ptr + expert * stride_be + inter + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # The oracle's F.linear output is in the model dtype; the activation then runs in float32, rounded once.
        gate = round_to(acc_gate, ROUNDING)
        up = round_to(acc_up, ROUNDING)
        if CLAMPED:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            h = (up + 1.0) * (gate / (1.0 + tl.exp(-alpha * gate)))
        else:
            h = gate / (1.0 + tl.exp(-gate)) * up
        h = round_to(h, ROUNDING)
        # Padding rows are written too (x read as 0 there): GEMM 2 then never reads uninitialised memory.
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, ws_ptr, b_ptr, topk_weights_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_valid, hidden, inter,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_om,
    HAS_BIAS: tl.constexpr, MXFP4: tl.constexpr, ROUNDING: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + rows)
        row_ok = ids < num_valid
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < inter
            a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + k[None, :], mask=k_ok[None, :], other=0.0)
            w = _weight_tile(w_ptr, ws_ptr, expert, n, k, k_ok[:, None] & n_ok[None, :], stride_we, stride_wn,
                             stride_se, stride_sn, MXFP4).to(h_ptr.dtype.element_ty)
            if DOT_F32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + expert * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # As the oracle: expert output in the model dtype, times the routing weight cast to it, rounded again.
        y = round_to(acc, ROUNDING)
        weight = round_to(tl.load(topk_weights_ptr + ids, mask=row_ok, other=0.0).to(tl.float32), ROUNDING)
        y = round_to(y * weight[:, None], ROUNDING)
        tl.store(out_ptr + ids.to(tl.int64)[:, None] * stride_om + n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def _tile(size: int) -> int:
    return max(16, min(64, triton.next_power_of_2(size)))  # tl.dot needs 16 in every dim


def fused_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: torch.Tensor | None,
    w2_bias: torch.Tensor | None,
    activation: tuple[str, float, float],
    w13_scales: torch.Tensor | None = None,
    w2_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over each token's top-k experts of weight * w2 @ act(w13 @ x + b13) + b2, as FusedMoE.forward.

    x [T, H] (float32/bfloat16/float16); topk_weights [T, k] float32; topk_ids [T, k] int. Unquantised experts:
    w13 [E, 2I, H], w2 [E, H, I] in x's dtype. MXFP4 experts: w13 / w2 are the uint8 blocks [E, 2I, H/32, 16] /
    [E, H, I/32, 16] with w13_scales / w2_scales [E, 2I, H/32] / [E, H, I/32]. Biases [E, 2I] / [E, H] or None.
    activation: ("silu", 0, 0) or ("clamped_swiglu", limit, alpha). Returns [T, H] in x's dtype.
    An id equal to E is an assignment to an expert held elsewhere (expert parallelism): skipped, it adds nothing."""
    kind, limit, alpha = activation
    if kind not in _ACTIVATIONS:
        raise ValueError(f"fused_moe activations are {_ACTIVATIONS}, not {kind!r}.")
    rounding = rounding_of(x.dtype)
    mxfp4 = w13_scales is not None
    num_experts = w13.shape[0]
    T, H = x.shape
    top_k = topk_ids.shape[1]
    inter = w2.shape[2] * 32 if mxfp4 else w2.shape[2]
    if mxfp4:
        for blocks in (w13, w2):
            if blocks.dtype != torch.uint8 or blocks.stride(3) != 1 or blocks.stride(2) != 16:
                raise ValueError("MXFP4 expert blocks must be uint8 with contiguous [.., groups, 16] rows.")
    elif w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("Expert weights must be contiguous along their input dimension.")
    x = x.contiguous()
    out = torch.zeros(T, top_k, H, dtype=x.dtype, device=x.device)  # skipped assignments' rows stay 0
    if T == 0 or top_k == 0:
        return out.sum(1)

    num_valid = T * top_k
    # Small batches (decode) give most experts a handful of rows: 16-row blocks waste less on padding.
    block_m = 16 if num_valid <= 16 * num_experts else 64
    # Id E gets a run of its own, sorted last, whose blocks are then marked as nobody's.
    sorted_ids, block_expert = moe_align(topk_ids, num_experts + 1, block_m)
    block_expert = block_expert.masked_fill(block_expert == num_experts, -1)
    h = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    common = dict(
        ROUNDING=rounding, DOT_F32=_INTERPRET, BLOCK_M=block_m,
        # float32 models get exact float32 products, not TF32's 10-bit mantissas (the default for float32 dots).
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    s13 = w13_scales if mxfp4 else w13  # never read when unquantised
    s2 = w2_scales if mxfp4 else w2
    b13 = w13_bias if w13_bias is not None else x
    b2 = w2_bias if w2_bias is not None else x

    # MXFP4 tiles decode in registers beside the two accumulators: at 4 warps they spill 584-784 B a thread on
    # sm_90 (python -m microscale.kernels.aot.sweep); 8 warps and 32-deep K tiles (one scale group) need 128.
    num_warps = 8 if mxfp4 else 4
    block_n, block_k = _tile(inter), 32 if mxfp4 else _tile(H)
    _gate_up_kernel[(block_expert.numel(), triton.cdiv(inter, block_n))](
        x, w13, s13, b13, h, sorted_ids, block_expert,
        num_valid, top_k, H, inter, float(limit), float(alpha),
        x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        b13.stride(0) if w13_bias is not None else 0, h.stride(0),
        CLAMPED=kind == "clamped_swiglu", HAS_BIAS=w13_bias is not None, MXFP4=mxfp4,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **common,
    )
    block_n, block_k = _tile(H), _tile(inter)
    flat_out = out.view(num_valid, H)
    _down_kernel[(block_expert.numel(), triton.cdiv(H, block_n))](
        h, w2, s2, b2, weights, flat_out, sorted_ids, block_expert,
        num_valid, H, inter,
        h.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        b2.stride(0) if w2_bias is not None else 0, flat_out.stride(0),
        HAS_BIAS=w2_bias is not None, MXFP4=mxfp4, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, **common,
    )
    # Every (token, choice) row was written at most once: the sum over k is deterministic.
    return out.sum(1, dtype=torch.float32).to(x.dtype)
