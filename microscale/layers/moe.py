"""Mixture-of-experts layers: top-k routing and the experts, computed only for the tokens routed to them."""

from __future__ import annotations

import torch
from torch import nn

from microscale.distributed.parallel_state import expert_parallel, tp_rank, tp_size
from microscale.kernels.candidates import Candidate, always, pick_for_family
from microscale.kernels.selector import triton_unavailable_reason
from microscale.quant.base import ExpertsQuantMethod, UnquantizedExpertsMethod


def route_top_k(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token, then a softmax over the chosen k (gpt-oss, Mixtral): (weights, expert ids),
    each [tokens, top_k]."""
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return values.softmax(dim=-1), ids


class FusedMoE(nn.Module):
    """The experts of one MoE layer. Weights live in the QuantMethod's storage (16-bit or packed MXFP4):
    w13 [experts, 2 * intermediate, hidden] (gate rows then up rows) and w2 [experts, hidden, intermediate]."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, bias: bool,
        dtype: torch.dtype, activation: nn.Module, quant_method: ExpertsQuantMethod | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        # Expert parallel: this rank holds experts [first_expert, first_expert + num_local) whole.
        self.num_local = num_experts // tp_size() if expert_parallel() else num_experts
        self.first_expert = tp_rank() * self.num_local if expert_parallel() else 0
        self.activation = activation
        self.quant_method = quant_method or UnquantizedExpertsMethod()
        self.quant_method.create_weights(self, self.num_local, hidden_size, intermediate_size, bias, dtype)
        self.kernel = _REFERENCE.fn  # select_kernels picks the kernel family's (the runner calls it once)

    def select_kernels(self, family: str, device: torch.device) -> None:
        picked = pick_for_family("MoE experts", family, [_FUSED], _REFERENCE, device)
        self.kernel = picked.fn

    @property
    def fused(self) -> bool:
        """Runs the fused Triton kernel (microscale/kernels/fused_moe.py): no host sync."""
        return self.kernel is _FUSED.fn

    def load_weight(self, name: str, loaded: torch.Tensor, shard: int | None = None) -> list[str]:
        return self.quant_method.load_weight(self, name, self._rank_slice(name, loaded))

    def _rank_slice(self, name: str, loaded: torch.Tensor) -> torch.Tensor:
        """Tensor parallel over the intermediate dim: this rank's gate and up rows of w13 (dim 1: gate rows,
        then up rows), its input columns of w2 (dim 2; packed MXFP4 counts them in 32-value groups), and the
        down bias on rank 0 only (the ranks' outputs are summed). Slices are contiguous: MXFP4 packs them."""
        n, rank = tp_size(), tp_rank()
        if n == 1:
            return loaded
        if expert_parallel():  # whole experts (and their biases): every expert lives on exactly one rank
            return loaded.narrow(0, self.first_expert, self.num_local).contiguous()
        if name.startswith("w13"):
            half = loaded.shape[1] // 2
            part = half // n
            return torch.cat((loaded.narrow(1, rank * part, part), loaded.narrow(1, half + rank * part, part)), dim=1)
        if name == "w2_bias":
            return loaded if rank == 0 else torch.zeros_like(loaded)
        if name.startswith("w2"):
            part = loaded.shape[2] // n
            return loaded.narrow(2, rank * part, part).contiguous()
        return loaded

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x: [tokens, hidden]; weights, expert_ids: [tokens, top_k]. Sum over each token's experts of
        weight * expert(x)."""
        if self.num_local != self.num_experts:  # expert parallel: ids become local, num_local = held elsewhere
            expert_ids = expert_ids - self.first_expert
            elsewhere = (expert_ids < 0) | (expert_ids >= self.num_local)
            expert_ids = expert_ids.masked_fill(elsewhere, self.num_local)
            weights = weights.masked_fill(elsewhere, 0.0)
        return self.kernel(self, x, weights, expert_ids)


def _fused(moe: FusedMoE, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    from microscale.kernels.fused_moe import fused_moe

    return fused_moe(x, weights, expert_ids, **moe.quant_method.fused_operands(moe), w13_bias=moe.w13_bias,
                     w2_bias=moe.w2_bias, activation=moe.activation.kernel_spec())


def _reference(moe: FusedMoE, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """One linear pair per expert over the tokens routed to it."""
    flat_ids = expert_ids.flatten()
    order = flat_ids.argsort(stable=True)  # assignments grouped by expert, tokens in order within each
    tokens = order // moe.top_k
    order_weights = weights.flatten()[order, None].to(x.dtype)
    # The reference loops over experts in Python, so it needs the group sizes on the host: one sync per
    # layer (the fused Triton MoE kernel does this on the device). Id num_local (other ranks') sorts last.
    counts = torch.bincount(flat_ids, minlength=moe.num_local + 1)[: moe.num_local].tolist()
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        idx = tokens[rows]
        w13, w2 = moe.quant_method.expert_linears(moe, expert, x.dtype, count)
        b13 = None if moe.w13_bias is None else moe.w13_bias[expert]
        b2 = None if moe.w2_bias is None else moe.w2_bias[expert]
        hidden = moe.activation(w13(x[idx], b13))
        out.index_add_(0, idx, w2(hidden, b2) * order_weights[rows])
        start += count
    return out


_FUSED = Candidate("triton fused MoE (expert grouping on the device: no host sync)", triton_unavailable_reason, _fused)
_REFERENCE = Candidate("torch reference (a loop over the experts, their token counts read on the host)", always,
                       _reference)
