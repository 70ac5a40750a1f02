"""F.linear for weights of the model dtype, where decode-sized inputs on a CPU go through the C product
(kernels/cpu_gemv.py: 2-3x the speed of oneDNN/MKL for one to eight rows) and everything else through linear()
(BLAS; batch-invariant in deterministic mode).

In a compiled forward the product is one opaque op, microscale::dense_linear, that picks its path per call: the
dynamic-shape graph's row count is known only when it runs."""

from __future__ import annotations

import torch

from microscale.kernels.batch_invariant import linear
from microscale.kernels.cpu_gemv import cpu_gemv_applies, dense_gemv, dense_gemv_unavailable_reason


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, like F.linear."""
    if not _gemv_available(weight.device, weight.dtype, weight.shape[-1]):
        return linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.microscale.dense_linear(x, weight, bias)
    return _dense_linear(x, weight, bias)


@torch.compiler.assume_constant_result  # a fact of the machine and the weight: a compiled graph keeps it
def _gemv_available(device: torch.device, dtype: torch.dtype, k: int) -> bool:
    return dense_gemv_unavailable_reason(device, dtype, k) is None


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if not (x.dtype == weight.dtype and weight.is_contiguous() and cpu_gemv_applies(rows)):
        return linear(x, weight, bias)
    return dense_gemv(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _dense_linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# A plain dispatcher op (not torch.library.custom_op): its eager call costs a few microseconds, not tens.
_LIBRARY = torch.library.Library("microscale", "FRAGMENT")
_LIBRARY.define("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("dense_linear", _dense_linear, "CompositeExplicitAutograd")
torch.library.register_fake("microscale::dense_linear", _dense_linear_shape, lib=_LIBRARY)
