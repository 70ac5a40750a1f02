from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from microscale.attention.backend import AttentionBackend
from microscale.attention.metadata import AttentionMetadata
from microscale.distributed.parallel_state import tp_rank
from microscale.quant.base import copy_checked
from microscale.quant.kv_cache import KVCache


class Attention(nn.Module):
    """Writes the new keys/values into this layer's paged KV cache and attends, through a backend.
    With `sinks=True` (gpt-oss) each head has a learned logit that joins its softmax denominator."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None, layer_index: int,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.window = window
        # Kept in float32 whatever the model dtype: they join float32 scores (bf16 values convert exactly).
        self.sinks = nn.Parameter(torch.zeros(num_heads), requires_grad=False) if sinks else None
        self.backend: AttentionBackend | None = None  # both bound by the model runner
        self.kv_cache: KVCache | None = None

    def load_weight(self, name: str, loaded: torch.Tensor, shard: int | None = None) -> list[str]:
        """The checkpoint's sinks cover every head; a tensor-parallel rank keeps those of its heads."""
        if name != "sinks" or self.sinks is None:
            raise ValueError(f"Checkpoint tensor {name!r} has no place in an attention layer.")
        copy_checked(self.sinks, loaded.narrow(0, tp_rank() * self.num_heads, self.num_heads))
        return ["sinks"]

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata | None
    ) -> torch.Tensor:
        """meta None: a compiled forward, whose graph calls the opaque attention op; the step's metadata is in
        compiled_step (a graph cannot take the metadata's per-step Python structure without recompiling)."""
        if meta is None:
            return torch.ops.microscale.attention(q, k, v, self.layer_index)
        return self.backend.forward(
            q, k, v, self.kv_cache, meta, self.scale, self.window, self.layer_index, self.sinks
        )


# ---- attention as one opaque op of a compiled forward ------------------------------------------------------
# Inductor compiles everything around it; the op itself runs eagerly, reading the step's metadata and the
# calling runner's layers from a context variable (two runners, e.g. speculative decoding's draft, may share a
# process and a thread).

_STEP: contextvars.ContextVar[tuple[list[Attention], AttentionMetadata]] = contextvars.ContextVar("compiled_step")


@contextlib.contextmanager
def compiled_step(layers: list[Attention], meta: AttentionMetadata) -> Iterator[None]:
    """Within the block, the attention op of layer i runs layers[i] (in layer order) on `meta`."""
    token = _STEP.set((layers, meta))
    try:
        yield
    finally:
        _STEP.reset(token)


def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_index: int) -> torch.Tensor:
    layers, meta = _STEP.get()
    return Attention.forward(layers[layer_index], q, k, v, meta)


def _attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_index: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# A plain dispatcher op (not torch.library.custom_op): its eager call costs a few microseconds, not tens.
_LIBRARY = torch.library.Library("microscale", "FRAGMENT")
_LIBRARY.define("attention(Tensor q, Tensor k, Tensor v, int layer_index) -> Tensor")
_LIBRARY.impl("attention", _attention_op, "CompositeExplicitAutograd")
torch.library.register_fake("microscale::attention", _attention_shape, lib=_LIBRARY)
