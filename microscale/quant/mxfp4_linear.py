"""The "mxfp4" Linear method: weight-only W4A16. Weights are stored as MXFP4 (about 4.25 bits each). The Triton
GEMM dequantises them in registers (microscale/kernels/mxfp4_gemm.py); on a CPU a C kernel does the same for up
to 8 tokens (microscale/kernels/cpu_gemv.py); the torch reference unpacks the whole weight to the activation
dtype for every matmul."""

from __future__ import annotations

import functools

import torch
from torch import nn

from microscale.kernels.batch_invariant import linear
from microscale.kernels.candidates import Candidate, always, pick_kernel
from microscale.kernels.cpu_gemv import MAX_TOKENS, cpu_gemv_applies, cpu_gemv_unavailable_reason, mxfp4_gemv
from microscale.kernels.selector import triton_unavailable_reason
from microscale.quant.base import QuantMethod
from microscale.quant.mxfp4 import MXFP4_BLOCK, pack_mxfp4, unpack_mxfp4
from microscale.quant.scratch import scratch_buffer

_PACKED_NAMES = ["weight_blocks", "weight_scales"]


def _packed(shape: tuple[int, ...], weight_loader) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(shape, dtype=torch.uint8), requires_grad=False)
    param.weight_loader = weight_loader
    return param


class Mxfp4LinearMethod(QuantMethod):
    """W4A16 with MXFP4 weights: `weight_blocks` uint8 [out, in / 32, 16] and `weight_scales` uint8
    [out, in / 32], out-features major with the 32-value blocks along the input dim, as in gpt-oss
    checkpoints; `bias` (optional) stays in the model dtype.

    Checkpoint tensors reach it through `Linear.load_weight(name, tensor, shard)`: a floating `weight`
    [rows, in] (a 16/32-bit checkpoint, quantised online) is packed straight into its shard's rows, one tensor
    at a time, so the whole model's 16-bit weights are never resident; `weight_blocks` / `weight_scales`
    (a checkpoint already in MXFP4) and `bias` are copied into their rows as they are.
    """

    def create_weights(self, layer, input_size, output_sizes, bias, dtype, weight_loader) -> None:
        if input_size % MXFP4_BLOCK:
            raise ValueError(
                f"MXFP4 needs a Linear input size divisible by {MXFP4_BLOCK}; got {input_size}."
            )
        out, groups = sum(output_sizes), input_size // MXFP4_BLOCK
        layer.register_parameter("weight_blocks", _packed((out, groups, MXFP4_BLOCK // 2), weight_loader))
        layer.register_parameter("weight_scales", _packed((out, groups), weight_loader))
        if bias:
            b = nn.Parameter(torch.zeros(out, dtype=dtype), requires_grad=False)
            b.weight_loader = weight_loader
            layer.register_parameter("bias", b)
        else:
            layer.register_parameter("bias", None)

    def load_weight(self, layer: nn.Module, name: str, loaded: torch.Tensor, shard: int | None) -> list[str]:
        if name != "weight":
            return super().load_weight(layer, name, loaded, shard)
        blocks, scales = layer.weight_blocks, layer.weight_scales
        sizes = {layer.checkpoint_input_size, layer.input_size}  # whole, or read as this rank's columns
        if not loaded.is_floating_point() or loaded.dim() != 2 or loaded.shape[1] not in sizes:
            raise ValueError(
                f"An MXFP4 Linear takes a floating weight [rows, {layer.checkpoint_input_size}]; got {loaded.dtype} "
                f"{tuple(loaded.shape)}."
            )
        # Pack where the weights live (the GPU, when there is one); the 16-bit tensor is dropped right after.
        packed_blocks, packed_scales = pack_mxfp4(loaded.to(blocks.device))
        blocks.weight_loader(blocks, packed_blocks, shard)
        scales.weight_loader(scales, packed_scales, shard)
        return list(_PACKED_NAMES)

    def select_kernel(self, layer, family, device) -> None:
        cpu = Candidate(f"CPU MXFP4 products decoded in registers for up to {MAX_TOKENS} tokens (torch above)",
                        functools.partial(cpu_gemv_unavailable_reason, k=layer.input_size), _cpu_matmul)
        candidates = [_TRITON, _REFERENCE] if family == "triton" else [cpu, _REFERENCE]
        layer.mxfp4_matmul = pick_kernel("MXFP4 linear", candidates, device).fn

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return getattr(layer, "mxfp4_matmul", _reference_matmul)(layer, x)


def _reference_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    blocks = layer.weight_blocks
    shape = (blocks.shape[0], blocks.shape[1] * MXFP4_BLOCK)
    weight = unpack_mxfp4(blocks, layer.weight_scales, x.dtype,
                          out=scratch_buffer("mxfp4-linear", shape, x.dtype, blocks.device))
    return linear(x, weight, layer.bias)  # the bias is created in the model dtype


def cpu_mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] times the MXFP4 weight, decoded in registers as it is read (kernels/cpu_gemv.py), float32 sums,
    plus the bias, in x's dtype."""
    y = mxfp4_gemv(x.float().contiguous(), blocks, scales)
    if bias is not None:
        y += bias
    return y.to(x.dtype)


def _cpu_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if not cpu_gemv_applies(flat.shape[0]):
        return _reference_matmul(layer, x)
    y = cpu_mxfp4_linear(flat, layer.weight_blocks, layer.weight_scales, layer.bias)
    return y.view(*x.shape[:-1], -1)


def _triton_matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from microscale.kernels.mxfp4_gemm import mxfp4_linear

    flat = x.reshape(-1, x.shape[-1])
    return mxfp4_linear(flat, layer.weight_blocks, layer.weight_scales, layer.bias).view(*x.shape[:-1], -1)


_TRITON = Candidate("triton MXFP4 GEMM (dequantised in registers)", triton_unavailable_reason, _triton_matmul)
_REFERENCE = Candidate("torch (unpack, then F.linear)", always, _reference_matmul)
