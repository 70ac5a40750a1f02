"""The "mxfp4" weight format: W4A16 with OCP MX blocks of 32 (microscale/quant/mxfp4.py), for Linear layers and
MoE experts. Its checkpoints follow gpt-oss's own (transformers loads them): the MoE experts as `*_blocks`
(uint8, two FP4 values per byte) and `*_scales` (E8M0), out-features major; attention, router, norms,
embeddings and biases keep their 16/32-bit tensors; config.json says `quant_method: mxfp4`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from microscale.quant.format import CheckpointExport, CheckpointQuant, WeightFormat, register_weight_format
from microscale.quant.mxfp4 import MXFP4_BLOCK, pack_mxfp4
from microscale.quant.mxfp4_experts import Mxfp4ExpertsMethod
from microscale.quant.mxfp4_linear import Mxfp4LinearMethod

if TYPE_CHECKING:
    from microscale.config import ModelConfig
    from microscale.quant.kv_cache import KVCache

# gpt-oss's MXFP4 checkpoints leave these in 16 bits (config.json's modules_to_not_convert).
_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_EXPERT_PROJECTIONS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")


@register_weight_format
class Mxfp4Format(WeightFormat):
    name = "mxfp4"
    linear_method_class = Mxfp4LinearMethod
    experts_method_class = Mxfp4ExpertsMethod
    checkpoint_method = "mxfp4"
    checkpoint_description = "MXFP4 MoE experts (the gpt-oss layout)"
    exportable = True

    def read_checkpoint(self, quantization_config: dict[str, Any]) -> CheckpointQuant:
        return CheckpointQuant(experts=self.name)  # everything but the experts is in 16 bits

    def tensor_parallel_problems(self, cfg: ModelConfig, n: int, whole_experts: bool, linear: bool) -> list[str]:
        # Each rank's slice of a row-parallel input (the MLP's or the experts' intermediate, the attention
        # output) is packed in blocks of 32 of its own.
        problems = []
        if not whole_experts and (cfg.intermediate_size // n) % MXFP4_BLOCK:
            problems.append(f"an MXFP4 intermediate slice of {cfg.intermediate_size // n} (not a multiple of 32)")
        if linear and (cfg.num_attention_heads // n * cfg.head_dim) % MXFP4_BLOCK:
            problems.append(f"an MXFP4 attention-output slice of {cfg.num_attention_heads // n * cfg.head_dim}")
        return problems

    def export(self, cfg: ModelConfig, model: nn.Module | None, kv_caches: list[KVCache]) -> CheckpointExport:
        if cfg.num_experts == 0:
            raise ValueError(
                "MXFP4 checkpoints hold MoE experts (the gpt-oss layout); quantize a dense model at load time "
                "instead, with --quant mxfp4."
            )
        config = {"quant_method": self.checkpoint_method, "modules_to_not_convert": _NOT_CONVERTED}
        return CheckpointExport(_packed_experts, config)


def _packed_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if not name.endswith(_EXPERT_PROJECTIONS):
        yield name, tensor
        return
    # [experts, in, out] -> out-features major, quantised one expert at a time.
    packed = [pack_mxfp4(expert.t()) for expert in tensor]
    yield f"{name}_blocks", torch.stack([blocks for blocks, _ in packed])
    yield f"{name}_scales", torch.stack([scales for _, scales in packed])
