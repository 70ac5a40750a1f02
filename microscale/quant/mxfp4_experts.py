"""MoE experts stored in MXFP4 (the gpt-oss checkpoint layout): each expert's w13 / w2 as uint8 blocks
[experts, out, in / 32, 16] (two FP4 values per byte) and E8M0 scales [experts, out, in / 32]; about 4.25
bits per weight. An expert is dequantised only when a token is routed to it (torch reference); on a CPU, a few
tokens (decode) multiply its packed weights directly (microscale/kernels/cpu_gemv.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from microscale.kernels.cpu_gemv import cpu_gemv_applies, cpu_gemv_unavailable_reason
from microscale.quant.base import ExpertsQuantMethod, copy_checked, create_expert_biases
from microscale.quant.mxfp4 import MXFP4_BLOCK, pack_mxfp4, unpack_mxfp4
from microscale.quant.mxfp4_linear import cpu_mxfp4_linear
from microscale.quant.scratch import scratch_buffer


def _packed(shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.uint8), requires_grad=False)


class Mxfp4ExpertsMethod(ExpertsQuantMethod):
    def create_weights(self, layer, num_experts, hidden_size, intermediate_size, bias, dtype) -> None:
        for name, out, inp in (("w13", 2 * intermediate_size, hidden_size), ("w2", hidden_size, intermediate_size)):
            if inp % MXFP4_BLOCK:
                raise ValueError(f"MXFP4 experts need input sizes divisible by {MXFP4_BLOCK}; {name} has {inp}.")
            groups = inp // MXFP4_BLOCK
            layer.register_parameter(f"{name}_blocks", _packed((num_experts, out, groups, MXFP4_BLOCK // 2)))
            layer.register_parameter(f"{name}_scales", _packed((num_experts, out, groups)))
        create_expert_biases(layer, num_experts, hidden_size, intermediate_size, bias, dtype)

    def load_weight(self, layer, name, loaded) -> list[str]:
        if name not in ("w13", "w2"):
            return super().load_weight(layer, name, loaded)
        # A 16/32-bit checkpoint: quantise one expert at a time, so no more than one is ever unpacked.
        blocks, scales = getattr(layer, f"{name}_blocks"), getattr(layer, f"{name}_scales")
        if loaded.shape != (*scales.shape[:2], scales.shape[2] * MXFP4_BLOCK):
            raise ValueError(f"Checkpoint experts of shape {tuple(loaded.shape)} do not fit {name}.")
        for expert in range(loaded.shape[0]):
            expert_blocks, expert_scales = pack_mxfp4(loaded[expert])
            copy_checked(blocks[expert], expert_blocks)
            copy_checked(scales[expert], expert_scales)
        return [f"{name}_blocks", f"{name}_scales"]

    def fused_operands(self, layer) -> dict[str, torch.Tensor | None]:
        return {"w13": layer.w13_blocks, "w2": layer.w2_blocks, "w13_scales": layer.w13_scales,
                "w2_scales": layer.w2_scales}

    def expert_weights(self, layer, expert, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid until the next call (of any layer): they are decoded into shared scratch buffers."""
        return tuple(
            unpack_mxfp4(blocks[expert], scales[expert], dtype, out=scratch_buffer(
                f"mxfp4-{name}", (blocks.shape[1], blocks.shape[2] * MXFP4_BLOCK), dtype, blocks.device))
            for name, blocks, scales in (("w13", layer.w13_blocks, layer.w13_scales),
                                         ("w2", layer.w2_blocks, layer.w2_scales))
        )

    def expert_linears(self, layer, expert, dtype, tokens):
        # On a CPU, a few tokens (decode) multiply the packed weights directly (no 16-bit copy of the expert).
        hidden = layer.w13_blocks.shape[2] * MXFP4_BLOCK  # both input widths are whole MXFP4 blocks
        if not cpu_gemv_applies(tokens) or cpu_gemv_unavailable_reason(layer.w13_blocks.device, hidden) is not None:
            return super().expert_linears(layer, expert, dtype, tokens)
        return (_packed_linear(layer.w13_blocks[expert], layer.w13_scales[expert]),
                _packed_linear(layer.w2_blocks[expert], layer.w2_scales[expert]))


def _packed_linear(blocks: torch.Tensor, scales: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor | None],
                                                                           torch.Tensor]:
    return lambda x, bias: cpu_mxfp4_linear(x, blocks, scales, bias)
