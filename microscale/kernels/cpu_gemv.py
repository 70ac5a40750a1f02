"""A few tokens (decode) times a weight on the CPU, bound by reading the weight (kernels/cpu/gemv.c):
- FP8 and MXFP4 weights decoded in vector registers as they are read. Dequantising first writes and re-reads a
  16-bit copy, which made them slower than bfloat16 on a CPU although they hold a half and a quarter of its bytes.
- Weights of the model dtype (float32, bfloat16, float16), read at up to 2-3x the speed oneDNN/MKL reach for
  one to eight rows (bfloat16 [3072, 576]: 43 vs 15 GB/s; [49152, 576], a vocabulary: 56 vs 27 GB/s).

Built at first use (kernels/cpu_build.py); a machine without a C compiler or an x86-64 CPU with AVX2, FMA
and F16C keeps the dequantising path (the kernel selector logs why)."""

from __future__ import annotations

import ctypes
import functools

import torch

from microscale.kernels.batch_invariant import batch_invariant_enabled
from microscale.kernels.cpu_build import DTYPE_CODES, load_cpu_library, loaded_library

K_MULTIPLE = 32  # the low-bit kernels step through K in blocks of 32 (an MXFP4 block; two FP8 vectors)
DENSE_K_MULTIPLE = 16  # the others in steps of two vectors
MAX_TOKENS = 8  # more rows than this re-read the weight often enough that dequantise-then-matmul wins


def _bind(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.microscale_fp8_gemv.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.microscale_fp8_gemv.restype = None
    lib.microscale_mxfp4_gemv.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.microscale_mxfp4_gemv.restype = None
    lib.microscale_dense_gemv.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.microscale_dense_gemv.restype = ctypes.c_int


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why it cannot run here)."""
    return load_cpu_library("gemv.c", _bind)


def cpu_gemv_unavailable_reason(device: torch.device, k: int) -> str | None:
    """Why the low-bit CPU products cannot run a weight with `k` inputs on `device`, or None."""
    if device.type != "cpu":
        return f"a CPU kernel, not for {device.type}"
    if k % K_MULTIPLE:
        return f"needs K a multiple of {K_MULTIPLE} (K={k})"
    return _load()[1]


@functools.cache
def dense_gemv_unavailable_reason(device: torch.device, dtype: torch.dtype, k: int) -> str | None:
    """Why the CPU product cannot run a `dtype` weight with `k` inputs on `device`, or None."""
    if device.type != "cpu":
        return f"a CPU kernel, not for {device.type}"
    if dtype not in DTYPE_CODES:
        return f"takes float32, bfloat16 or float16 weights, not {dtype}"
    if k % DENSE_K_MULTIPLE:
        return f"needs K a multiple of {DENSE_K_MULTIPLE} (K={k})"
    return _load()[1]


def cpu_gemv_applies(tokens: int) -> bool:
    """Whether the CPU kernel takes a matmul of `tokens` rows: up to MAX_TOKENS (more, in prefill, re-read the
    weight often enough that dequantise-then-matmul wins), and not in deterministic mode (whose 8-row matmuls
    must not depend on how many rows a step has)."""
    return tokens <= MAX_TOKENS and not batch_invariant_enabled()


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    """The float32 [M, n] result for a checked x."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 2:
        raise ValueError(f"x must be a contiguous float32 [M, K] tensor, got {x.dtype} {tuple(x.shape)}.")
    return torch.empty(x.shape[0], n, dtype=torch.float32)


def fp8_gemv(x: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] times w_q float8_e4m3fn [N, K] transposed: float32 [M, N], each product of the exact FP8
    value summed in float32 (no scale: the caller applies it to the [M, N] result)."""
    n, k = w_q.shape
    if w_q.dtype != torch.float8_e4m3fn or not w_q.is_contiguous() or x.shape[-1] != k or k % K_MULTIPLE:
        raise ValueError(f"w_q must be a contiguous float8_e4m3fn [N, K] with K={x.shape[-1]} a multiple of "
                         f"{K_MULTIPLE}, got {w_q.dtype} {tuple(w_q.shape)}.")
    y = _output(x, n)
    _library().microscale_fp8_gemv(x.data_ptr(), w_q.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                                   torch.get_num_threads())
    return y


def mxfp4_gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] times the MXFP4 weight (blocks uint8 [N, K / 32, 16], scales uint8 [N, K / 32])
    transposed: float32 [M, N], each block's products summed in float32, then times its scale."""
    n, groups = scales.shape
    k = groups * K_MULTIPLE
    if (blocks.shape != (n, groups, K_MULTIPLE // 2) or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8
            or not (blocks.is_contiguous() and scales.is_contiguous()) or x.shape[-1] != k):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} (contiguous uint8) do "
                         f"not match x {tuple(x.shape)}.")
    y = _output(x, n)
    # Each block's even elements first, then its odd ones: the order the kernel reads low and high nibbles in.
    split = x.view(x.shape[0], groups, K_MULTIPLE // 2, 2).transpose(-1, -2).contiguous()
    _library().microscale_mxfp4_gemv(split.data_ptr(), blocks.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                     x.shape[0], n, k, torch.get_num_threads())
    return y


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K], weight [N, K] and bias [N] of one dtype (float32, bfloat16 or
    float16): each output a float32 sum, plus the bias, rounded once to the dtype."""
    n, k = weight.shape
    if (x.dim() != 2 or x.shape[1] != k or x.dtype != weight.dtype or weight.dtype not in DTYPE_CODES
            or not weight.is_contiguous() or k % DENSE_K_MULTIPLE
            or (bias is not None and (bias.shape != (n,) or bias.dtype != weight.dtype))):
        raise ValueError(f"dense_gemv takes x [M, K], a contiguous weight [N, K] with K a multiple of "
                         f"{DENSE_K_MULTIPLE} and a bias [N], of one dtype: got {x.dtype} {tuple(x.shape)}, "
                         f"{weight.dtype} {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}.")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    status = _library().microscale_dense_gemv(x.data_ptr(), weight.data_ptr(),
                                              None if bias is None else bias.data_ptr(), y.data_ptr(), x.shape[0],
                                              n, k, DTYPE_CODES[x.dtype], torch.get_num_threads())
    if status:
        raise MemoryError(f"dense_gemv could not allocate its {x.shape[0]} x ({k} + {n}) float32 scratch.")
    return y


def _library() -> ctypes.CDLL:
    return loaded_library(_load(), "The CPU products (kernels/cpu/gemv.c)")
