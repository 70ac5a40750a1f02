"""OpenAI gpt-oss (GptOssForCausalLM): the Llama skeleton with attention sinks, alternating sliding-window
and full attention, YaRN RoPE, float32 norms, and a top-k mixture of experts with a clamped SwiGLU.

Checkpoints hold the experts either in 16/32 bits (gate_up_proj [experts, hidden, 2 * intermediate] with
gate and up columns interleaved; down_proj [experts, intermediate, hidden]) or in MXFP4 (`*_blocks` /
`*_scales`, out-features major, the same interleaved rows). They are converted here to FusedMoE's layout:
out-features major, gate rows then up rows.
"""

from __future__ import annotations

import torch
from torch import nn

from microscale.config import ModelConfig
from microscale.distributed.parallel_state import all_reduce, expert_parallel, tp_size
from microscale.layers.activation import ClampedSwiGLU
from microscale.layers.linear import Linear
from microscale.layers.moe import FusedMoE, route_top_k
from microscale.models.llama import LlamaForCausalLM
from microscale.quant.scheme import QuantScheme

_DEFAULT_SWIGLU_ALPHA = 1.702  # transformers' GptOssConfig default
_DEFAULT_SWIGLU_LIMIT = 7.0


class GptOssMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        # The router stays unquantized (as in gpt-oss's own MXFP4 checkpoints): it is tiny and picks experts.
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=True, dtype=dtype)
        hf = cfg.hf_config
        activation = ClampedSwiGLU(hf.get("swiglu_limit", _DEFAULT_SWIGLU_LIMIT),
                                   hf.get("swiglu_alpha", _DEFAULT_SWIGLU_ALPHA))
        # Tensor parallel: every rank routes (the router is replicated) and runs its slice of every expert's
        # intermediate dim, or (expert parallel) its whole experts; the partial outputs are summed.
        inter = cfg.intermediate_size if expert_parallel() else cfg.intermediate_size // tp_size()
        self.experts = FusedMoE(cfg.num_experts, self.top_k, cfg.hidden_size, inter, True, dtype, activation,
                                quant.experts_method())

    def input_fp8_scale(self) -> None:
        return None  # the router and the experts take the model dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = route_top_k(self.router(x), self.top_k)
        return all_reduce(self.experts(x, weights, expert_ids))


def _deinterleave(tensor: torch.Tensor) -> torch.Tensor:
    """Rows (dim 1) g0 u0 g1 u1 ... -> g0 g1 ... u0 u1 ..."""
    return torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)


class GptOssForCausalLM(LlamaForCausalLM):
    float32_norms = True

    def make_mlp(self, cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme) -> nn.Module:
        return GptOssMLP(cfg, dtype, quant)

    def map_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, int | None]:
        if name.endswith(".self_attn.sinks"):
            return name.replace(".self_attn.sinks", ".self_attn.attn.sinks"), tensor, None
        prefix, sep, part = name.partition(".mlp.experts.")
        if not sep:
            return super().map_checkpoint_tensor(name, tensor)
        proj, _, suffix = part.partition("_proj")  # "gate_up", "_blocks"
        ours = {"gate_up": "w13", "down": "w2"}.get(proj)
        if ours is None:
            raise ValueError(f"Unexpected expert tensor {name!r} in a gpt-oss checkpoint.")
        if suffix == "":  # 16/32-bit experts, stored [experts, in, out]
            tensor = tensor.transpose(1, 2)
        if ours == "w13":
            tensor = _deinterleave(tensor)
        return f"{prefix}.mlp.experts.{ours}{suffix}", tensor, None
