"""Paged attention for prefill and extend steps: variable-length query chunks, each attending causally to its
sequence's cached prefix and its own new tokens, all read from the paged KV cache through a block table.

Flash-attention style: one program per (chunk, block of BLOCK_M queries, KV head). A program holds the queries
of every query head sharing that KV head (GQA) as rows of one tile, so each K/V block is loaded once for the
whole group; it walks the key blocks that the causal mask (and sliding window) leave visible, with an online
softmax in float32. int8 / int4 / fp8 caches are dequantised on read with their per-slot scales (and int4's
zero points).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.int4 import check_int4_operands, dequantize_kv, unpack_int4
from microscale.kernels.selector import interpreting

# Under the interpreter tl.dot on bfloat16 operands multiplies raw bit patterns: upcast to float32 there.
_INTERPRET = interpreting()  # read once: kernels are defined (and their constexprs fixed) at import


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, sinks_ptr, out_ptr,
    tables_ptr, query_starts_ptr, context_starts_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_ot, stride_oh, stride_od,
    stride_table, stride_table_col,
    scale, window,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, QUANTIZED: tl.constexpr, INT4: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0)
    qblock = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(query_starts_ptr + chunk).to(tl.int32)
    q_len = tl.load(query_starts_ptr + chunk + 1).to(tl.int32) - q_start
    m_start = qblock * BLOCK_M
    # The grid is sized by the longest chunk: shorter chunks have nothing to do in their tail blocks.
    if m_start < q_len:
        ctx_start = tl.load(context_starts_ptr + chunk).to(tl.int32)
        ctx_len = ctx_start + q_len

        # Tile rows are (query, head in group) pairs: row r is query m_start + r // GROUP_P of head r % GROUP_P.
        rows = tl.arange(0, BLOCK_M * GROUP_P)
        q_idx = m_start + rows // GROUP_P
        g_idx = rows % GROUP_P
        head = kv_head * GROUP + g_idx
        row_ok = (q_idx < q_len) & (g_idx < GROUP)
        q_pos = ctx_start + q_idx
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        # int4: byte j holds elements 2j and 2j + 1 (head_dim is even).
        half_d = tl.arange(0, BLOCK_D // 2)
        half_d_ok = half_d < HEAD_DIM // 2

        q_rows = (q_start + q_idx).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M * GROUP_P], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M * GROUP_P], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_P, BLOCK_D], tl.float32)

        # Keys this block's queries may see: up to its last query, and from its first query's window on.
        hi = tl.minimum(ctx_start + m_start + BLOCK_M, ctx_len)
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(ctx_start + m_start - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        table_row = tables_ptr + chunk.to(tl.int64) * stride_table
        for n_start in range(lo, hi, BLOCK_N):
            k_pos = n_start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < hi
            # Slots past the context (and padding table entries) are never read: masked loads give 0, not NaN.
            block = tl.load(table_row + (k_pos // BLOCK_SIZE) * stride_table_col, mask=k_ok, other=0).to(tl.int64)
            offset = k_pos % BLOCK_SIZE
            kv_ok = k_ok[:, None] & d_ok[None, :]
            if INT4:
                packed_ok = k_ok[:, None] & half_d_ok[None, :]
                k = unpack_int4(tl.load(
                    k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
                    + half_d[None, :] * stride_kd, mask=packed_ok, other=0,
                ))
                v = unpack_int4(tl.load(
                    v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
                    + half_d[None, :] * stride_vd, mask=packed_ok, other=0,
                ))
            else:
                k = tl.load(
                    k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :] * stride_kd, mask=kv_ok, other=0.0,
                )
                v = tl.load(
                    v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :] * stride_vd, mask=kv_ok, other=0.0,
                )
            if QUANTIZED:
                # Dequantised to the model dtype, as the cache's own read does, so both paths round alike.
                k = dequantize_kv(k, ks_ptr, kz_ptr, block * stride_ksb + offset * stride_kss + kv_head * stride_ksh,
                                  k_ok, INT4)
                v = dequantize_kv(v, vs_ptr, vz_ptr, block * stride_vsb + offset * stride_vss + kv_head * stride_vsh,
                                  k_ok, INT4)
                k = k.to(q_ptr.dtype.element_ty)
                v = v.to(q_ptr.dtype.element_ty)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            if USE_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, -float("inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf: shift by 0 there so exp gives 0, not NaN.
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv = tl.dot(p, v, input_precision=DOT_PRECISION)
            else:
                # Probabilities in the model dtype, as the reference's probs.to(q.dtype) @ values.
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if USE_SINKS:
            # The sink joins only the denominator: rescale everything to max(m, sink) to stay in range.
            sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
            m_final = tl.maximum(m_i, sink)
            alpha = tl.exp(m_i - m_final)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha + tl.exp(sink - m_final)

        l_i = tl.where(row_ok, l_i, 1.0)
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
        )


def paged_prefill_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_starts: torch.Tensor,
    max_query_len: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    k_zero: torch.Tensor | None = None,
    v_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each chunk's queries q[query_starts[i]:query_starts[i+1]] (at positions
    context_starts[i] + j) over keys [0, context_starts[i] + query_len) of the paged cache through
    block_tables[i]. q: [T, num_heads, head_dim]; keys/values: [num_blocks, block_size, kv_heads, head_dim] as
    stored (int4: uint8 [..., head_dim / 2], two codes a byte), with per-slot dequantisation scales
    k_scale/v_scale when quantised (and zero points k_zero/v_zero for int4, strided as their scales). Returns
    [T, num_heads, head_dim] in q.dtype; rows of q outside every chunk are left uninitialised."""
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = keys.shape
    num_chunks = block_tables.shape[0]
    group = heads // kv_heads
    int4 = check_int4_operands(keys, head_dim, k_scale, v_scale, k_zero, v_zero)
    out = torch.empty_like(q)
    if num_chunks == 0 or max_query_len == 0 or tokens == 0:
        return out

    group_p = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Tile rows = BLOCK_M queries x group heads: aim at 64 rows (at least 16 queries, tl.dot's minimum).
    block_m = max(16, 64 // group_p)
    # 128-row tiles (gpt-oss's 8 heads a group) take 32 keys: at 64 they spill on sm_80/89 (aot sweep).
    block_n = 64 if block_d <= 64 and block_m * group_p < 128 else 32
    quantized = k_scale is not None
    if quantized and q.dtype == torch.float32:
        # Dequantised float32 tiles into "ieee" dots spill ~5 KB a thread on sm_90 at 32 keys; ~300 B at 16
        # (the least found: float32 models with a quantised KV cache are the one such configuration).
        block_n = 16
    if quantized:
        ks, vs = k_scale, v_scale
        ks_strides, vs_strides = ks.stride(), vs.stride()
    else:
        ks = vs = keys  # never read
        ks_strides = vs_strides = (0, 0, 0)
    # A 128-row x 128-dim float32 accumulator is 128 registers a thread at 4 warps: use 8 from there. float32
    # models' exact ("ieee") dots run on CUDA cores with both operand tiles in registers: at 4 warps they spill
    # ~8 KB a thread on sm_90, at 8 none (python -m microscale.kernels.aot.sweep).
    # Dequantising K/V tiles costs registers too: 8 warps from 128 x 64 there (gpt-oss with an int8 cache spilled
    # ~400 B a thread at 4 on sm_80/89).
    wide = block_m * group_p * block_d >= (128 * 64 if quantized else 128 * 128)
    num_warps = 8 if wide or q.dtype == torch.float32 else 4
    grid = (num_chunks, triton.cdiv(max_query_len, block_m), kv_heads)
    kz, vz = (k_zero, v_zero) if int4 else (ks, vs)
    _prefill_attention_kernel[grid](
        q, keys, values, ks, vs, kz, vz, sinks if sinks is not None else q, out,
        block_tables, query_starts.contiguous(), context_starts.contiguous(),
        *q.stride(), *keys.stride(), *values.stride(), *ks_strides, *vs_strides, *out.stride(),
        *block_tables.stride(),
        float(scale), int(window) if window is not None else 0,
        GROUP=group, GROUP_P=group_p, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        USE_WINDOW=window is not None, USE_SINKS=sinks is not None, QUANTIZED=quantized, INT4=int4,
        # float32 models get exact float32 products, not TF32's 10-bit mantissas (the default for float32 dots).
        DOT_F32=_INTERPRET, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out
