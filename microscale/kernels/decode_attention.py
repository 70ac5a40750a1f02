"""Paged attention for decode (one query token per sequence), split-K ("flash-decoding").

Pass 1, grid (sequences, KV heads, splits): each program takes every query head of one KV head (they share the
K/V loads) over one slice of the attended context, reading K/V through the block table and dequantising int8 /
int4 / fp8 on read, and writes a partial softmax (running max, sum, unnormalised accumulator) to float32 scratch.
Pass 2, grid (sequences, query heads): merges the splits by log-sum-exp and adds the sink term once.

Matches TorchAttentionBackend._decode over the paged cache (microscale/attention/torch_backend.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.int4 import check_int4_operands, dequantize_kv, unpack_int4
from microscale.kernels.selector import interpreting

# Read once, like Triton itself: the interpreter's tl.dot multiplies raw 16-bit patterns of bfloat16 operands,
# so under it the dot operands stay float32 (DOT_FP32).
_INTERPRET = interpreting()  # read once: kernels are defined (and their constexprs fixed) at import

# Context positions per tile. Under the interpreter a smaller tile makes tiny test contexts span several tiles.
_BLOCK_N = 16 if _INTERPRET else 64
# 8 warps: no register spills for 64 x 128 tiles in any storage dtype (checked by compiling for sm_90; not yet
# timed on a GPU).
_NUM_WARPS = 8
# Query heads per KV head from which the score and value products use tl.dot (the group padded to >= 16 rows).
# A single head (MHA) multiplies elementwise and reduces with tl.sum, wasting no rows; for larger groups the
# broadcast product's registers grow with the group.
_DOT_MIN_GROUP = 2
# Choosing num_splits: enough programs to fill the GPU, each split at least this many positions.
_TARGET_PROGRAMS = 264
_MIN_SPLIT_LEN = 256
_MAX_SPLITS = 32


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, bt_ptr, cl_ptr,
    m_ptr, l_ptr, acc_ptr,
    scale, window, block_size, num_splits,
    sq_n, sq_h, sq_d,
    sk_b, sk_s, sk_h, sk_d,
    sv_b, sv_s, sv_h, sv_d,
    sks_b, sks_s, sks_h,
    svs_b, svs_s, svs_h,
    sbt_n, sbt_b, scl,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, QUANT: tl.constexpr, INT4: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = kvh * GROUP + rows
    # int4: byte j holds elements 2j and 2j + 1 (head_dim is even).
    half_dims = tl.arange(0, D_PAD // 2)
    half_dim_ok = half_dims < HEAD_DIM // 2

    q_raw = tl.load(
        q_ptr + seq * sq_n + heads[:, None] * sq_h + dims[None, :] * sq_d,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    q = q_raw.to(tl.float32)

    # The query sits at position ctx - 1 and sees [lo, ctx); the splits partition that span in whole tiles.
    ctx = tl.load(cl_ptr + seq * scl).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
    per_split = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    s_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    # An empty split (start >= end) runs no tile and stores m = -inf, sum 0: pass 2 gives it weight 0.
    for tile in range(start, end, BLOCK_N):
        pos = tile + offs
        ok = pos < end
        block = tl.load(bt_ptr + seq * sbt_n + (pos // block_size) * sbt_b, mask=ok, other=0).to(tl.int64)
        slot = pos % block_size
        kv_ok = ok[:, None] & dim_ok[None, :]
        if INT4:
            packed_ok = ok[:, None] & half_dim_ok[None, :]
            k = unpack_int4(tl.load(k_ptr + block[:, None] * sk_b + slot[:, None] * sk_s + kvh * sk_h
                                    + half_dims[None, :] * sk_d, mask=packed_ok, other=0))
            v = unpack_int4(tl.load(v_ptr + block[:, None] * sv_b + slot[:, None] * sv_s + kvh * sv_h
                                    + half_dims[None, :] * sv_d, mask=packed_ok, other=0))
        else:
            k = tl.load(k_ptr + block[:, None] * sk_b + slot[:, None] * sk_s + kvh * sk_h + dims[None, :] * sk_d,
                        mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + block[:, None] * sv_b + slot[:, None] * sv_s + kvh * sv_h + dims[None, :] * sv_d,
                        mask=kv_ok, other=0.0)
        if QUANT:
            # Strided loads: a per-head or per-tensor scale arrives as a zero-stride view of every slot.
            k = dequantize_kv(k, ks_ptr, kz_ptr, block * sks_b + slot * sks_s + kvh * sks_h, ok, INT4)
            v = dequantize_kv(v, vs_ptr, vz_ptr, block * svs_b + slot * svs_s + kvh * svs_h, ok, INT4)

        if USE_DOT:
            if DOT_FP32:
                # float32 stays exact (ieee, not tf32).
                scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                # The model dtype on tensor cores, as the torch backend computes it; unquantised K/V need no
                # conversion at all (fewer registers).
                scores = tl.dot(q_raw, tl.trans(k.to(q_raw.dtype)))
        else:
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        scores = tl.where(ok[None, :], scores * scale, float("-inf"))

        # Every tile has at least one position in range, so m_new is finite and no -inf - -inf arises.
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            if DOT_FP32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(q_raw.dtype), v.to(q_raw.dtype))
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m = m_new

    part = (seq * num_heads + heads) * num_splits + split  # scratch [n, num_heads, num_splits(, head_dim)]
    tl.store(m_ptr + part, m, mask=row_ok)
    tl.store(l_ptr + part, s_sum, mask=row_ok)
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _reduce_kernel(
    m_ptr, l_ptr, acc_ptr, sinks_ptr, out_ptr,
    num_splits, so_n, so_h, so_d,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)

    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, D_PAD)
    split_ok = splits < num_splits
    dim_ok = dims < HEAD_DIM
    part = (seq * num_heads + head) * num_splits + splits

    m = tl.load(m_ptr + part, mask=split_ok, other=float("-inf"))
    s_sum = tl.load(l_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                  other=0.0)

    top = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        top = tl.maximum(top, sink)
    # All splits empty (a zero-length context): a finite reference keeps exp(-inf - top) = 0, never NaN.
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(m - top)
    denom = tl.sum(s_sum * weight, axis=0)
    if HAS_SINKS:
        denom += tl.exp(sink - top)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + seq * so_n + head * so_h + dims * so_d, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def choose_num_splits(max_context: int, num_seqs: int, kv_heads: int, window: int | None = None) -> int:
    """Splits for a batch whose longest context is `max_context`: enough programs to fill the GPU, no split
    shorter than _MIN_SPLIT_LEN positions. Call it once outside a CUDA graph and pass the result as num_splits."""
    span = max_context if window is None else min(max_context, window)
    wanted = triton.cdiv(_TARGET_PROGRAMS, max(1, num_seqs * kv_heads))
    return max(1, min(wanted, triton.cdiv(span, _MIN_SPLIT_LEN), _MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    k_zero: torch.Tensor | None = None,
    v_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of q [n, num_heads, head_dim] over the paged cache keys/values [num_blocks, block_size,
    kv_heads, head_dim] (model dtype, int8 or fp8; dequantised as stored.float() * k_scale/v_scale [num_blocks,
    block_size, kv_heads] when given; int4: uint8 [..., head_dim / 2], two codes a byte, dequantised as
    code * scale + k_zero/v_zero, the zero points strided as their scales). Sequence i's query is at position
    context_lens[i] - 1 and its keys lie in blocks block_tables[i]. window: keys at positions > p - window only;
    sinks [num_heads]: an extra logit per head in the softmax denominator. num_splits=None reads
    context_lens.max() on the host (a sync); pass it explicitly (e.g. from choose_num_splits) under CUDA graphs.
    Returns [n, num_heads, head_dim] in q.dtype."""
    n, num_heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = keys.shape
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_heads {kv_heads}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale come together")
    int4 = check_int4_operands(keys, head_dim, k_scale, v_scale, k_zero, v_zero)
    out = torch.empty((n, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(int(context_lens.max().item()), n, kv_heads, window)
    group = num_heads // kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    use_dot = group >= _DOT_MIN_GROUP and d_pad >= 16  # tl.dot needs >= 16 along each dim
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)

    m = torch.empty((n, num_heads, num_splits), dtype=torch.float32, device=q.device)
    s_sum = torch.empty_like(m)
    acc = torch.empty((n, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    quant = k_scale is not None
    # Dequantised float32 K/V tiles beside float32 ("ieee") dots: 64 positions spill ~190 B a thread on sm_90,
    # 32 still 120 B, 16 none (python -m microscale.kernels.aot.sweep).
    block_n = 16 if quant and q.dtype == torch.float32 else _BLOCK_N
    # Unused pointers when not quantised: any tensor serves, the loads are compiled out.
    ks, vs = (k_scale, v_scale) if quant else (keys, values)
    ks_strides = k_scale.stride() if quant else (0, 0, 0)
    vs_strides = v_scale.stride() if quant else (0, 0, 0)
    kz, vz = (k_zero, v_zero) if int4 else (ks, vs)
    _split_kernel[(n, kv_heads, num_splits)](
        q, keys, values, ks, vs, kz, vz, block_tables, context_lens,
        m, s_sum, acc,
        scale, window if window is not None else 0, block_size, num_splits,
        *q.stride(), *keys.stride(), *values.stride(), *ks_strides, *vs_strides,
        *block_tables.stride(), context_lens.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=block_n,
        HAS_WINDOW=window is not None, QUANT=quant, INT4=int4, USE_DOT=use_dot,
        DOT_FP32=_INTERPRET or q.dtype == torch.float32, num_warps=_NUM_WARPS,
    )
    _reduce_kernel[(n, num_heads)](
        m, s_sum, acc, sinks if sinks is not None else m, out,
        num_splits, *out.stride(),
        HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(num_splits), HAS_SINKS=sinks is not None,
    )
    return out
