"""Rounding helpers the kernels share. Every cast that rounds is done explicitly in float32 with torch's
rounding (nearest, ties to even), so the final cast is exact: the compiled kernel and Triton's CPU interpreter
(whose float32 -> bfloat16 cast truncates, and whose float8 cast rounds ties away and loses the carry into the
exponent) then store the same bits as torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Globals read inside kernels must be constexpr.
INT8_MAX = tl.constexpr(127.0)
FP8_MAX = tl.constexpr(448.0)

# How a float32 value is rounded before it is stored in a floating dtype (a constexpr of the kernels).
F32, BF16, F16 = 0, 1, 2
_ROUNDING = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}


def rounding_of(dtype: torch.dtype) -> int:
    if dtype not in _ROUNDING:
        raise ValueError(f"Triton kernels take float32, bfloat16 or float16 activations, got {dtype}.")
    return _ROUNDING[dtype]


@triton.jit
def round_half_even(y):
    """Nearest integer, ties to even (torch.round); libdevice's rint is not available in the interpreter.
    floor(y + 0.5) would be wrong for the float just below 0.5, where y + 0.5 rounds up to 1."""
    r = tl.floor(y)
    frac = y - r  # exact
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)


@triton.jit
def round_to(y, KIND: tl.constexpr):
    """y (float32) rounded to the nearest value of the dtype KIND names, still as float32."""
    if KIND == 1:
        # bfloat16: add half an ulp (minus one unless the kept lsb is odd) and cut the low 16 bits.
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        y = bits.to(tl.float32, bitcast=True)
    elif KIND == 2:
        y = y.to(tl.float16).to(tl.float32)  # numpy's cast, used by the interpreter, rounds to nearest even
    return y


@triton.jit
def quantize_fp8(y):
    """(y).clamp(-448, 448).to(float8_e4m3fn) as torch computes it (ties to even), as float8e4nv."""
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    bits = y.to(tl.int32, bitcast=True)
    mag_bits = bits & 0x7FFFFFFF
    sign = bits ^ mag_bits
    # Normal E4M3 values keep 3 mantissa bits; below 2^-6 the grid is the fixed subnormal step 2^-9.
    normal = (mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) & -1048576
    mag = mag_bits.to(tl.float32, bitcast=True)
    subnormal = (round_half_even(mag * 512.0) * (1.0 / 512.0)).to(tl.int32, bitcast=True)
    mag_bits = tl.where(mag < 0.015625, subnormal, normal)
    return (mag_bits | sign).to(tl.float32, bitcast=True).to(tl.float8e4nv)
