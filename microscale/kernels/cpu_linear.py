"""F.linear for weights of the model dtype, where decode-sized inputs on a CPU go through a C product and
everything else through linear() (BLAS; batch-invariant in deterministic mode):
- bfloat16 weights on a CPU with AMX: the tile kernel, at any row count (kernels/cpu_amx.py: 2-4x oneDNN at
  decode sizes, level with it in prefill, and no per-row-count kernel compilation; batch-invariant rows);
- otherwise up to eight rows: the vector kernel (kernels/cpu_gemv.py: 2-3x oneDNN/MKL for one to eight rows).

In a compiled forward the product is one opaque op, microscale::dense_linear, that picks its path per call: the
dynamic-shape graph's row count is known only when it runs."""

from __future__ import annotations

import torch

from microscale.kernels.batch_invariant import linear
from microscale.kernels.cpu_amx import amx_linear, amx_unavailable_reason
from microscale.kernels.cpu_gemv import cpu_gemv_applies, dense_gemv, dense_gemv_unavailable_reason


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like F.linear."""
    n, k = weight.shape
    if not (_amx_available(weight.device, weight.dtype, n, k) or _gemv_available(weight.device, weight.dtype, k)):
        return linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.microscale.dense_linear(x, weight, bias)
    return _dense_linear(x, weight, bias)


# Facts of the machine and the weight: a compiled graph keeps them as constants.
@torch.compiler.assume_constant_result
def _amx_available(device: torch.device, dtype: torch.dtype, n: int, k: int) -> bool:
    return amx_unavailable_reason(device, dtype, n, k) is None


@torch.compiler.assume_constant_result
def _gemv_available(device: torch.device, dtype: torch.dtype, k: int) -> bool:
    return dense_gemv_unavailable_reason(device, dtype, k) is None


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    n, k = weight.shape
    if x.dtype == weight.dtype and weight.is_contiguous():
        flat = x.reshape(rows, k)
        if _amx_available(weight.device, weight.dtype, n, k):
            return amx_linear(flat, weight, bias).view(*x.shape[:-1], n)
        if cpu_gemv_applies(rows) and _gemv_available(weight.device, weight.dtype, k):
            return dense_gemv(flat, weight, bias).view(*x.shape[:-1], n)
    return linear(x, weight, bias)


def _dense_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# A plain dispatcher op (not torch.library.custom_op): its eager call costs a few microseconds, not tens.
_LIBRARY = torch.library.Library("microscale", "FRAGMENT")
_LIBRARY.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("dense_linear", _dense_linear, "CompositeExplicitAutograd")
torch.library.register_fake("microscale::dense_linear", _dense_linear_shape, lib=_LIBRARY)
