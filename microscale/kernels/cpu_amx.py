"""bfloat16 products on Intel AMX tiles (kernels/cpu/amx_matmul.c), for every row count.

oneDNN (what F.linear runs on these CPUs) repacks a weight it is handed in torch's [N, K] layout on every call,
which at decode sizes costs more than the product, and compiles a kernel for each new row count, ~1 ms a shape
(a serving engine's prefill chunks bring new row counts all the time: [1536, 256] at 300-400 rows took 1.4 ms a
call where a row count seen before took 0.25). The kernel reads the weight as it lies (it is the tiles' A
operand), packs only x, and compiles nothing: bfloat16 [3072, 576] at 8-32 rows 2-3x oneDNN's speed, [1536, 256]
2-4x, the [49152, 576] vocabulary 1.7x, and level with a warmed oneDNN from ~200 rows on
(benchmarks/results/cpu-speed.md). Each output is a float32 sum in one fixed k order whatever the batch, so its
bits do not depend on the rows beside it (deterministic mode needs nothing more).

Built at first use (kernels/cpu_build.py); a CPU without AMX-BF16 (before Sapphire Rapids), a Linux that refuses
the tile registers, or a machine without a C compiler keeps oneDNN."""

from __future__ import annotations

import ctypes
import functools

import torch

from microscale.kernels.cpu_build import load_cpu_library, loaded_library

N_MULTIPLE = 16  # weight rows per tile
K_MULTIPLE = 32  # bfloat16 values of k per tile row


def _bind(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.microscale_amx_supported.restype = ctypes.c_int
    lib.microscale_amx_bf16_matmul.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.microscale_amx_bf16_matmul.restype = ctypes.c_int


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why it cannot run here)."""
    library, reason = load_cpu_library("amx_matmul.c", _bind)
    if library is not None and not library.microscale_amx_supported():
        return None, "this CPU lacks AMX-BF16 (Intel Sapphire Rapids or later) or Linux refused its tile registers"
    return library, reason


@functools.cache
def amx_unavailable_reason(device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
    """Why the AMX product cannot run a `dtype` weight [n, k] on `device`, or None."""
    if device.type != "cpu":
        return f"a CPU kernel, not for {device.type}"
    if dtype != torch.bfloat16:
        return f"takes bfloat16 weights, not {dtype}"
    if n % N_MULTIPLE or k % K_MULTIPLE:
        return f"needs N a multiple of {N_MULTIPLE} and K of {K_MULTIPLE} (N={n}, K={k})"
    return _load()[1]


def amx_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for bfloat16 x [M, K], a contiguous weight [N, K] and bias [N]: float32 sums
    (of exact bfloat16 products), plus the bias, rounded once to bfloat16."""
    n, k = weight.shape
    if (x.dim() != 2 or x.shape[1] != k or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or not weight.is_contiguous() or n % N_MULTIPLE or k % K_MULTIPLE
            or (bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16))):
        raise ValueError(f"amx_linear takes bfloat16 x [M, K], a contiguous weight [N, K] (N a multiple of "
                         f"{N_MULTIPLE}, K of {K_MULTIPLE}) and a bias [N]: got {x.dtype} {tuple(x.shape)}, "
                         f"{weight.dtype} {tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}.")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    if x.shape[0] == 0:
        return y
    status = _library().microscale_amx_bf16_matmul(x.data_ptr(), weight.data_ptr(),
                                                   None if bias is None else bias.data_ptr(), y.data_ptr(),
                                                   x.shape[0], n, k, torch.get_num_threads())
    if status:
        raise MemoryError(f"amx_linear could not allocate its {x.shape[0]} x {k} packed copy of x.")
    return y


def _library() -> ctypes.CDLL:
    return loaded_library(_load(), "The AMX product (kernels/cpu/amx_matmul.c)")
