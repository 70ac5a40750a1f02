"""Packed int4 KV values in Triton kernels, in `microscale.quant.kv_cache`'s layout: two codes (0..15) a byte,
element 2j in the low nibble of byte j and element 2j + 1 in the high one; value = code * scale + zero."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT4_MAX = tl.constexpr(15.0)  # globals read inside kernels must be constexpr


@triton.jit
def unpack_int4(packed):
    """The codes [rows, 2 * bytes] of a tile of packed bytes [rows, bytes]. Loading each byte once and
    interleaving its nibbles keeps fewer registers live than loading every byte twice (a [rows, head_dim] tile at
    byte offsets dim // 2): the prefill kernel spilled ~2.7 KB a thread on sm_80 that way (aot sweep)."""
    return tl.interleave(packed & 0xF, packed >> 4)


@triton.jit
def dequantize_kv(codes, scale_ptr, zero_ptr, slot, ok, INT4: tl.constexpr):
    """A tile of stored keys or values [rows, dims] as float32: times each slot's scale and, for int4, plus its
    zero point (zero points share their scales' strides). code * scale is exact in float32 (see Int4KVCache in
    microscale/quant/kv_cache.py), so this rounds as the torch cache's multiply-then-add, FMA or not."""
    scale = tl.load(scale_ptr + slot, mask=ok, other=0.0).to(tl.float32)
    values = codes.to(tl.float32) * scale[:, None]
    if INT4:
        values += tl.load(zero_ptr + slot, mask=ok, other=0.0).to(tl.float32)[:, None]
    return values


def check_int4_operands(
    keys: torch.Tensor, head_dim: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
    k_zero: torch.Tensor | None, v_zero: torch.Tensor | None,
) -> bool:
    """Whether an attention kernel reads an int4 cache (uint8 keys), once its operands are checked to fit: scales
    and zero points both given, zero points strided as their scales, head_dim / 2 bytes a head."""
    if keys.dtype != torch.uint8:
        if k_zero is not None or v_zero is not None:
            raise ValueError(f"Zero points come only with an int4 (uint8) cache, not {keys.dtype}.")
        return False
    if k_scale is None or v_scale is None or k_zero is None or v_zero is None:
        raise ValueError("An int4 cache is read with k_scale, v_scale, k_zero and v_zero.")
    if 2 * keys.shape[-1] != head_dim:
        raise ValueError(f"An int4 cache holds head_dim / 2 bytes a head: {keys.shape[-1]} for head_dim {head_dim}.")
    if k_zero.stride() != k_scale.stride() or v_zero.stride() != v_scale.stride():
        raise ValueError("Zero points must have their scales' strides.")
    return True
