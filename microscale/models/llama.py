"""The Llama family: Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm).

The forward runs on one flat, unpadded batch of tokens from many sequences; attention reads and writes
the paged KV cache through the step's AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from microscale.attention.metadata import AttentionMetadata
from microscale.config import ModelConfig
from microscale.distributed.parallel_state import tp_rank, tp_size
from microscale.layers.activation import SiluAndMul
from microscale.layers.attention import Attention
from microscale.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from microscale.layers.linear import Linear
from microscale.layers.norm import RMSNorm
from microscale.layers.rotary import RotaryEmbedding
from microscale.models.weights import load_named_tensors
from microscale.quant.scheme import QuantScheme

# checkpoint name part -> (fused parameter name part, shard index)
_FUSED_SHARDS = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def _fused_name(name: str) -> tuple[str, int | None]:
    """A checkpoint name as (the fused parameter it fills, its shard), e.g. q_proj -> (qkv_proj, 0)."""
    for part, (fused, index) in _FUSED_SHARDS.items():
        if part in name:
            return name.replace(part, fused), index
    return name, None


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, dtype: torch.dtype, quant: QuantScheme
    ) -> None:
        super().__init__()
        # Tensor parallel: this rank's query heads, and its KV heads (replicated when there are fewer KV heads
        # than ranks: rank r then serves the KV head its query heads use).
        n, rank = tp_size(), tp_rank()
        self.num_heads = cfg.num_attention_heads // n
        self.num_kv_heads = max(1, cfg.num_key_value_heads // n)
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        first_kv_head = rank * cfg.num_key_value_heads // n
        kv_start = first_kv_head * self.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, [q_size, kv_size, kv_size], cfg.qkv_bias, dtype, quant.linear_method(),
            parallel="column", shard_starts=[rank * q_size, kv_start, kv_start],
        )
        self.o_proj = Linear(q_size, cfg.hidden_size, cfg.o_proj_bias, dtype, quant.linear_method(), parallel="row")
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, cfg.layer_windows[layer_idx],
            layer_idx, sinks=cfg.attention_sinks,
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata | None) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme) -> None:
        super().__init__()
        inter = cfg.intermediate_size // tp_size()
        self.gate_up_proj = Linear(cfg.hidden_size, [inter, inter], cfg.mlp_bias, dtype, quant.linear_method(),
                                   parallel="column")
        self.down_proj = Linear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, quant.linear_method(), parallel="row")
        self.act = SiluAndMul()

    def input_fp8_scale(self) -> torch.Tensor | None:
        """The static FP8 scale the norm before this MLP may quantise its output with (see RMSNorm)."""
        return self.gate_up_proj.static_fp8_input_scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A down projection with a static FP8 input scale gets its input quantised by the activation as it computes
        # (SwiGLU + FP8 quantisation fused, in TensorRT-LLM's terms): one pass over the intermediate activations.
        return self.down_proj(self.act(self.gate_up_proj(x), self.down_proj.static_fp8_input_scale()))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, dtype: torch.dtype, quant: QuantScheme,
        mlp: nn.Module, float32_norms: bool,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary, dtype, quant)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, float32_norms)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, float32_norms)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Norms feeding static-FP8 projections quantise as they normalise (the projections take FP8 input).
        qkv_scale = self.self_attn.qkv_proj.static_fp8_input_scale()
        if residual is None:
            residual = x
            x = self.input_layernorm(x, fp8_scale=qkv_scale)
        else:
            x, residual = self.input_layernorm(x, residual, qkv_scale)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual, self.mlp.input_fp8_scale())
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, max_position: int, quant: QuantScheme,
        make_mlp: Callable[[], nn.Module], float32_norms: bool,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, max_position, cfg.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, rotary, dtype, quant, make_mlp(), float32_norms)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, float32_norms)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None
    ) -> torch.Tensor:
        """meta None: inside a compiled forward (see Attention.forward)."""
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # Hooks for architectures that share this skeleton (gpt_oss.py): norms' precision, the MLP block, and
    # how checkpoint tensors map onto parameters.
    float32_norms = False

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_position: int, quant: QuantScheme) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(
            cfg, dtype, max_position, quant, lambda: self.make_mlp(cfg, dtype, quant), self.float32_norms
        )
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | None
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def make_mlp(self, cfg: ModelConfig, dtype: torch.dtype, quant: QuantScheme) -> nn.Module:
        return LlamaMLP(cfg, dtype, quant)

    def map_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor, int | None]:
        """(parameter name, tensor, shard of a fused parameter or None) for one checkpoint tensor."""
        param_name, shard = _fused_name(name)
        return param_name, tensor, shard

    def checkpoint_slice(self, name: str, shape: tuple[int, ...], dtype: str) -> tuple[int, int, int] | None:
        """(dim, start, length) of checkpoint tensor `name` that this tensor-parallel rank needs, when it can be
        read alone (see load_model); None: read it whole."""
        param_name, shard = _fused_name(name)
        module_name, _, local = param_name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:  # not a parameter of ours: load_weights reports it
            return None
        reader = getattr(module, "checkpoint_slice", None)
        return None if reader is None else reader(local, shard, shape, dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors by HF name; returns the parameter names that were filled."""
        kept = (
            (name, tensor) for name, tensor in weights
            if "rotary_emb.inv_freq" not in name
            and not (name == "lm_head.weight" and self.config.tie_word_embeddings)
        )
        return load_named_tensors(self, (self.map_checkpoint_tensor(name, t) for name, t in kept))
