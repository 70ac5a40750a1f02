"""What an attention backend is to the rest of the engine: the model runner binds it the KV caches, hands it
each step's metadata, and every attention layer calls its `forward`. The torch reference
(attention/torch_backend.py) and the Triton kernels (attention/triton_backend.py) are the two today;
attention/selector.py picks one."""

from __future__ import annotations

from typing import Protocol

import torch

from microscale.attention.metadata import AttentionMetadata
from microscale.quant.kv_cache import KVCache


class AttentionBackend(Protocol):
    name: str
    # Its decode steps can be captured in CUDA graphs: they read the paged cache in place, and the padded rows
    # of a replay write to one scratch block the runner allocates beside the cache.
    graph_safe: bool

    def bind_kv_caches(
        self, kv_caches: list[KVCache], num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int
    ) -> None:
        """The paged cache of every layer (in layer order) is allocated: `num_blocks` blocks of `block_size`
        tokens, for up to max_num_seqs sequences of max_model_len tokens."""

    def kv_cache_changed(self) -> None:
        """Values already in the cache changed (new scales re-quantised it): forget anything read from it."""

    def prepare(self, meta: AttentionMetadata) -> None:
        """Once per step, before the forward: the step's metadata, shared by every layer."""

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], the flat batch (decodes first, then prefill chunks)
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: KVCache,  # this layer's
        meta: AttentionMetadata,
        scale: float,
        window: int | None,  # sliding window in tokens; None: full causal
        layer_index: int,
        sinks: torch.Tensor | None = None,  # [num_heads] float32: a learned extra logit per head (gpt-oss)
    ) -> torch.Tensor:
        """Write the new keys/values into `kv_cache`, then attend: [T, num_heads * head_dim]."""
