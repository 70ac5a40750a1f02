"""KV cache write: store new tokens' keys and values in their paged slots, quantising on the way as
`microscale.quant.kv_cache` does (model dtype as is; int8 with dynamic per-token or static per-head scales; int4
with a dynamic per-token or static per-head scale and zero point, packed two values a byte; fp8 E4M3 with a
per-tensor scale). One program per (token, KV head) writes both the key and the value vector.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from microscale.kernels.int4 import INT4_MAX
from microscale.kernels.rounding import F32, INT8_MAX, quantize_fp8, round_half_even, round_to, rounding_of

_NONE, _INT8_STATIC, _INT8_DYNAMIC, _FP8, _INT4_STATIC, _INT4_DYNAMIC = 0, 1, 2, 3, 4, 5


@triton.jit
def _write_half(
    x_ptr, x_stride_t, x_stride_h,
    cache_ptr, c_stride_b, c_stride_s, c_stride_h,
    scale_ptr, s_stride_b, s_stride_s, s_stride_h,
    token, head, block, offset, head_dim,
    MODE: tl.constexpr, SCALE_ROUNDING: tl.constexpr, BLOCK_D: tl.constexpr,
):
    d = tl.arange(0, BLOCK_D)
    mask = d < head_dim
    x = tl.load(x_ptr + token * x_stride_t + head * x_stride_h + d, mask=mask, other=0.0).to(tl.float32)
    dst = cache_ptr + block * c_stride_b + offset * c_stride_s + head * c_stride_h + d
    if MODE == 0:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)  # exact: x came in that dtype
    else:
        scale_slot = scale_ptr + block * s_stride_b + offset * s_stride_s + head * s_stride_h
        if MODE == 2:
            amax = tl.max(tl.abs(x), axis=0)
            # int8_token_scales: amax / 127 rounded to the storage dtype; an all-zero vector gets 1.
            scale = round_to(tl.where(amax > 0, tl.math.div_rn(amax, INT8_MAX), 1.0), SCALE_ROUNDING)
            tl.store(scale_slot, scale.to(scale_ptr.dtype.element_ty))
        else:
            scale = tl.load(scale_slot).to(tl.float32)
        # Correctly rounded division, as torch's: `/` may compile to an approximate one.
        y = tl.math.div_rn(x, scale)
        if MODE == 3:
            tl.store(dst, quantize_fp8(y), mask=mask)
        else:
            # Clamping first gives the same result as torch's round-then-clamp (both are monotone).
            q = round_half_even(tl.minimum(tl.maximum(y, -INT8_MAX), INT8_MAX))
            tl.store(dst, q.to(tl.int8), mask=mask)


@triton.jit
def _write_half_int4(
    x_ptr, x_stride_t, x_stride_h,
    cache_ptr, c_stride_b, c_stride_s, c_stride_h,
    scale_ptr, zero_ptr, s_stride_b, s_stride_s, s_stride_h,
    token, head, block, offset, head_dim,
    DYNAMIC: tl.constexpr, SCALE_ROUNDING: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Byte j packs elements 2j (low nibble) and 2j + 1 (high): load them as two half-length vectors.
    j = tl.arange(0, BLOCK_D // 2)
    mask = 2 * j < head_dim  # head_dim is even: 2j + 1 is in range too
    src = x_ptr + token * x_stride_t + head * x_stride_h + 2 * j
    even = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    slot = block * s_stride_b + offset * s_stride_s + head * s_stride_h
    if DYNAMIC:
        # int4_token_params: scale (max - min) / 15 and zero point min, each rounded to the storage dtype; a
        # constant vector gets scale 1.
        lo = tl.minimum(tl.min(tl.where(mask, even, float("inf")), axis=0),
                        tl.min(tl.where(mask, odd, float("inf")), axis=0))
        hi = tl.maximum(tl.max(tl.where(mask, even, float("-inf")), axis=0),
                        tl.max(tl.where(mask, odd, float("-inf")), axis=0))
        scale = round_to(tl.where(hi > lo, tl.math.div_rn(hi - lo, INT4_MAX), 1.0), SCALE_ROUNDING)
        zero = round_to(lo, SCALE_ROUNDING)
        tl.store(scale_ptr + slot, scale.to(scale_ptr.dtype.element_ty))
        tl.store(zero_ptr + slot, zero.to(zero_ptr.dtype.element_ty))
    else:
        scale = tl.load(scale_ptr + slot).to(tl.float32)
        zero = tl.load(zero_ptr + slot).to(tl.float32)
    # As torch: (x - zero) rounded to float32, a correctly rounded division, round-then-clamp to 0..15 (clamping
    # first gives the same codes).
    low = round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(even - zero, scale), 0.0), INT4_MAX))
    high = round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(odd - zero, scale), 0.0), INT4_MAX))
    packed = low.to(tl.int32) | (high.to(tl.int32) << 4)
    dst = cache_ptr + block * c_stride_b + offset * c_stride_s + head * c_stride_h + j
    tl.store(dst, packed.to(tl.uint8), mask=mask)


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, x_stride_t, x_stride_h,
    key_ptr, value_ptr, c_stride_b, c_stride_s, c_stride_h,
    k_scale_ptr, v_scale_ptr, k_zero_ptr, v_zero_ptr, s_stride_b, s_stride_s, s_stride_h,
    blocks_ptr, offsets_ptr, head_dim,
    MODE: tl.constexpr, SCALE_ROUNDING: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    block = tl.load(blocks_ptr + token).to(tl.int64)
    offset = tl.load(offsets_ptr + token).to(tl.int64)
    token = token.to(tl.int64)
    if MODE >= 4:
        _write_half_int4(k_ptr, x_stride_t, x_stride_h, key_ptr, c_stride_b, c_stride_s, c_stride_h,
                         k_scale_ptr, k_zero_ptr, s_stride_b, s_stride_s, s_stride_h,
                         token, head, block, offset, head_dim, MODE == 5, SCALE_ROUNDING, BLOCK_D)
        _write_half_int4(v_ptr, x_stride_t, x_stride_h, value_ptr, c_stride_b, c_stride_s, c_stride_h,
                         v_scale_ptr, v_zero_ptr, s_stride_b, s_stride_s, s_stride_h,
                         token, head, block, offset, head_dim, MODE == 5, SCALE_ROUNDING, BLOCK_D)
    else:
        _write_half(k_ptr, x_stride_t, x_stride_h, key_ptr, c_stride_b, c_stride_s, c_stride_h,
                    k_scale_ptr, s_stride_b, s_stride_s, s_stride_h,
                    token, head, block, offset, head_dim, MODE, SCALE_ROUNDING, BLOCK_D)
        _write_half(v_ptr, x_stride_t, x_stride_h, value_ptr, c_stride_b, c_stride_s, c_stride_h,
                    v_scale_ptr, s_stride_b, s_stride_s, s_stride_h,
                    token, head, block, offset, head_dim, MODE, SCALE_ROUNDING, BLOCK_D)


def _mode(cache_dtype: torch.dtype, has_scales: bool, has_zeros: bool, dynamic: bool) -> int:
    if not has_scales:
        if dynamic:
            raise ValueError("dynamic needs the per-token scale storage as k_scale and v_scale.")
        return _NONE
    if (cache_dtype == torch.uint8) != has_zeros:
        raise ValueError("An int4 (uint8) cache takes zero points beside its scales, and only it does.")
    if cache_dtype == torch.int8:
        return _INT8_DYNAMIC if dynamic else _INT8_STATIC
    if cache_dtype == torch.uint8:
        return _INT4_DYNAMIC if dynamic else _INT4_STATIC
    if cache_dtype == getattr(torch, "float8_e4m3fn", None) and not dynamic:
        return _FP8
    raise ValueError(f"No KV cache quantisation stores {cache_dtype} (dynamic={dynamic}).")


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor,
    key_cache: torch.Tensor, value_cache: torch.Tensor,
    slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    dynamic: bool = False, k_zero: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
) -> None:
    """Store k, v [T, kv_heads, head_dim] (model dtype) in slots (slot_blocks[t], slot_offsets[t]) of the caches
    [num_blocks, block_size, kv_heads, head_dim] (storage dtype; int4: uint8 [..., head_dim / 2]), as
    `QuantizedKVCache.write` does.

    k_scale, v_scale (and for int4 k_zero, v_zero, with the scales' strides): None (caches in the model dtype)
    or [num_blocks, block_size, kv_heads], as `KVCache.kernel_operands()` gives them. With `dynamic` they are
    the per-token storage: each (token, head) scale (and zero point) is computed and stored there; otherwise
    each slot's is read (zero-stride views of per-head or per-tensor ones are fine)."""
    mode = _mode(key_cache.dtype, k_scale is not None, k_zero is not None, dynamic)
    if (k_scale is None) != (v_scale is None) or (k_zero is None) != (v_zero is None):
        raise ValueError("Give both k_scale and v_scale (and both k_zero and v_zero), or neither.")
    T, kv_heads, head_dim = k.shape
    if v.shape != k.shape or v.stride() != k.stride() or k.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must have the same shape and strides.")
    int4 = mode in (_INT4_STATIC, _INT4_DYNAMIC)
    if int4 and head_dim % 2:
        raise ValueError(f"An int4 cache packs two values a byte: head_dim must be even, got {head_dim}.")
    stored_dim = head_dim // 2 if int4 else head_dim
    if key_cache.shape[2:] != (kv_heads, stored_dim) or key_cache.stride(-1) != 1:
        raise ValueError(f"Cache of shape {tuple(key_cache.shape)} (last dim contiguous) cannot hold k of shape "
                         f"{tuple(k.shape)}.")
    if mode == _NONE and key_cache.dtype != k.dtype:
        raise ValueError(f"An unquantised cache stores the model dtype {k.dtype}, not {key_cache.dtype}.")
    if T == 0:
        return
    slot_blocks, slot_offsets = slot_blocks.contiguous(), slot_offsets.contiguous()  # read at stride 1
    if mode == _NONE:
        k_scale = v_scale = key_cache  # never read: any pointer will do
        scale_strides = (0, 0, 0)
    else:
        if k_scale.shape != key_cache.shape[:3] or v_scale.shape != k_scale.shape:
            raise ValueError(f"Scales must be [num_blocks, block_size, kv_heads] = {tuple(key_cache.shape[:3])}.")
        if v_scale.stride() != k_scale.stride():
            raise ValueError("k_scale and v_scale must have the same strides.")
        if k_zero is not None and any(z.shape != k_scale.shape or z.stride() != k_scale.stride()
                                      for z in (k_zero, v_zero)):
            raise ValueError("k_zero and v_zero must have the scales' shape and strides.")
        scale_strides = k_scale.stride()
    if k_zero is None:
        k_zero, v_zero = k_scale, v_scale  # never read
    scale_rounding = rounding_of(k_scale.dtype) if mode in (_INT8_DYNAMIC, _INT4_DYNAMIC) else F32
    _kv_cache_write_kernel[(T, kv_heads)](
        k, v, k.stride(0), k.stride(1),
        key_cache, value_cache, *key_cache.stride()[:3],
        k_scale, v_scale, k_zero, v_zero, *scale_strides,
        slot_blocks, slot_offsets, head_dim,
        MODE=mode, SCALE_ROUNDING=scale_rounding, BLOCK_D=triton.next_power_of_2(head_dim),
    )
