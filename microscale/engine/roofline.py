"""Per-step roofline accounting: the bytes a step had to move and the FLOPs it did, computed from the model's
shapes and the step's schedule (a few integers per chunk: no per-token Python, no host sync), and, divided by
the step's time, its achieved bytes/s and FLOP/s as a share of the device's peaks.

One rank's view (tensor parallelism: its shards and slices), counted as the least traffic the math needs:
- weights read once per step: every stored byte but the embeddings (only the step's rows) and the MoE experts;
  of those, only the experts the step routed to, at their stored precision (MXFP4 blocks + scales, FP8 +
  scales). Which experts were routed is on the device; reading it would sync, so the count is the expected
  number of distinct experts of T tokens each picking k of E uniformly: E * (1 - (1 - k/E)^T) per layer.
- the KV cache: each chunk reads every context token it attends once per layer (sliding-window layers: the
  union of its tokens' windows) and writes its new tokens, at the cache's bytes per token (scales included).
- activations: each op's input read and output written once at the chunk sizes, float32 logits of the
  sampled rows.
FLOPs: 2 x the matmul weights a token passes through (attention projections, the dense MLP or its k experts,
the router) x tokens, 2 x hidden x vocabulary per sampled row, and 4 x heads x head_dim per attended
(query, key) pair and layer (QK^T and PV)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from microscale.config import ModelConfig
from microscale.engine.device_peaks import DevicePeaks
from microscale.engine.plan import component_of
from microscale.layers.attention import Attention


@dataclass(frozen=True)
class LayerGroup:
    """Attention layers of one shape on this rank: how many, their heads, window and KV bytes per token."""

    count: int
    heads: int
    head_dim: int
    window: int | None
    kv_bytes_per_token: int


@dataclass(frozen=True)
class StepCost:
    tokens: int
    sampled_rows: int
    decode_only: bool  # every chunk one token (a decode); speculative verification chunks count as mixed
    weight_bytes: float
    kv_read_bytes: int
    kv_write_bytes: int
    activation_bytes: int
    flops: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes


def attended_keys(start: int, length: int, window: int | None) -> int:
    """(query, key) pairs of `length` queries at positions start .. start + length - 1, each attending to every
    key up to its own position (causal), or to the last `window` of them."""
    first, last = start + 1, start + length  # each query's key count without a window
    if window is None or last <= window:
        return (first + last) * length // 2
    below = max(0, min(last, window) - first + 1)  # queries whose count is under the window
    low_end = first + below - 1
    return (first + low_end) * below // 2 + (length - below) * window


def _chunk_sums(chunks: list[tuple[int, int]], window: int | None) -> tuple[int, int]:
    """(pairs, keys read) over chunks (query_len, context_start) for one layer of `window`."""
    pairs = keys = 0
    for length, start in chunks:
        pairs += attended_keys(start, length, window)
        end = start + length
        keys += end if window is None else min(end, window + length - 1)
    return pairs, keys


@dataclass(frozen=True)
class RooflineModel:
    """One rank's constants of a step's cost (from RooflineModel.of)."""

    hidden: int
    act_itemsize: int
    dense_weight_bytes: int  # stored bytes read whole every step (all but embeddings and experts; LM head in)
    embedding_row_bytes: int
    dense_params_per_token: int  # matmul weights one token passes through, experts excepted
    lm_head_params: int  # this rank's vocabulary rows x hidden
    vocab_rows: int
    groups: tuple[LayerGroup, ...]
    activation_bytes_per_token: int  # through every layer (op inputs read, outputs written)
    moe_layers: int = 0
    experts: int = 0  # on this rank
    experts_total: int = 0
    top_k: int = 0
    expert_bytes: float = 0  # one expert of one layer, as stored on this rank
    expert_params: int = 0  # its matmul weights

    @classmethod
    def of(cls, model: nn.Module, cfg: ModelConfig, dtype: torch.dtype, kv_bytes_per_token: list[int],
           tp: int = 1, expert_parallel: bool = False) -> RooflineModel:
        """From a built (or meta-device) model and its attention layers' KV bytes per token, in layer order."""
        attention = [m for m in model.modules() if isinstance(m, Attention)]
        shapes: dict[tuple, int] = {}
        for layer, kv in zip(attention, kv_bytes_per_token, strict=True):
            key = (layer.num_heads, layer.head_dim, layer.window, kv)
            shapes[key] = shapes.get(key, 0) + 1
        groups = tuple(LayerGroup(n, *key) for key, n in shapes.items())
        expert_total = embeddings = dense = 0
        for name, tensor in model.named_parameters():
            size = tensor.numel() * tensor.element_size()
            part = component_of(name)
            if part == "experts":
                expert_total += size
            elif part == "embeddings":
                embeddings += size
            elif part != "lm_head":
                dense += size
        lm_head = model.lm_head.weight
        dense += lm_head.numel() * lm_head.element_size()
        hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
        first = attention[0]
        q, kv = first.num_heads * first.head_dim, first.num_kv_heads * first.head_dim
        moe = cfg.num_experts > 0
        inter = cfg.intermediate_size if expert_parallel else cfg.intermediate_size // tp
        experts = cfg.num_experts // tp if (moe and expert_parallel) else cfg.num_experts
        per_layer = hidden * (q + 2 * kv) + q * hidden + (hidden * cfg.num_experts if moe else 3 * hidden * inter)
        routed = inter * (cfg.num_experts_per_tok if moe else 1)
        # qkv in/out, attention in/out, o_proj in/out, two norms (x and residual in, both out), the MLP's
        # input, gate/up out and in, activation out, down in and out.
        act = (hidden + q + 2 * kv) + (q + 2 * kv + q) + (q + hidden) + 8 * hidden + (hidden + 6 * routed + hidden)
        return cls(
            hidden=hidden, act_itemsize=dtype.itemsize, dense_weight_bytes=dense,
            embedding_row_bytes=hidden * dtype.itemsize, dense_params_per_token=layers * per_layer,
            lm_head_params=lm_head.shape[0] * hidden, vocab_rows=lm_head.shape[0], groups=groups,
            activation_bytes_per_token=layers * act * dtype.itemsize,
            moe_layers=layers if moe else 0, experts=experts, experts_total=cfg.num_experts,
            top_k=cfg.num_experts_per_tok, expert_bytes=expert_total / (layers * experts) if moe else 0,
            expert_params=3 * hidden * inter if moe else 0,
        )

    def expected_experts(self, tokens: int) -> float:
        """Distinct experts (of this rank's) that `tokens` tokens routed uniformly to k of E each would touch."""
        if not self.experts_total:
            return 0.0
        return self.experts * (1 - (1 - self.top_k / self.experts_total) ** tokens)

    def step_cost(self, chunks: list[tuple[int, int]], sampled_rows: int) -> StepCost:
        """The cost of one step of `chunks`, each (query_len, context_start)."""
        tokens = sum(length for length, _ in chunks)
        kv_read = kv_write = 0
        flops = 0.0
        for group in self.groups:
            pairs, keys = _chunk_sums(chunks, group.window)
            kv_read += group.count * keys * group.kv_bytes_per_token
            kv_write += group.count * tokens * group.kv_bytes_per_token
            flops += group.count * pairs * 4 * group.heads * group.head_dim
        weights = self.dense_weight_bytes + tokens * self.embedding_row_bytes
        if self.moe_layers:
            weights += self.moe_layers * self.expected_experts(tokens) * self.expert_bytes
            local_share = self.experts / self.experts_total  # expert parallel: this rank's share of routings
            flops += 2 * tokens * self.moe_layers * self.top_k * local_share * self.expert_params
        flops += 2 * tokens * self.dense_params_per_token + 2 * sampled_rows * self.lm_head_params
        activations = tokens * self.activation_bytes_per_token + sampled_rows * self.vocab_rows * 4
        return StepCost(tokens, sampled_rows, all(length == 1 for length, _ in chunks), weights, kv_read, kv_write,
                        activations, flops)


@dataclass(frozen=True)
class StepRoofline:
    """A step's cost over its time, against the device's peaks."""

    cost: StepCost
    seconds: float
    peaks: DevicePeaks

    @property
    def bytes_per_s(self) -> float:
        return self.cost.bytes / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.cost.flops / self.seconds

    @property
    def bandwidth_fraction(self) -> float:
        return self.bytes_per_s / self.peaks.bytes_per_s

    @property
    def compute_fraction(self) -> float:
        return self.flops_per_s / self.peaks.flops_per_s

    @property
    def speed_of_light(self) -> float:
        """The larger share of peak: the resource that bounds the step."""
        return max(self.bandwidth_fraction, self.compute_fraction)


@dataclass
class RooflineTotals:
    """Running sums for /metrics and bench reports, decode-only and mixed steps apart."""

    bytes: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "mixed": 0.0})
    flops: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "mixed": 0.0})
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "mixed": 0.0})
    steps: dict[str, int] = field(default_factory=lambda: {"decode": 0, "mixed": 0})

    def add(self, step: StepRoofline) -> None:
        kind = "decode" if step.cost.decode_only else "mixed"
        self.bytes[kind] += step.cost.bytes
        self.flops[kind] += step.cost.flops
        self.seconds[kind] += step.seconds
        self.steps[kind] += 1

    def summary(self, peaks: DevicePeaks) -> dict[str, dict[str, float]]:
        """Per kind of step ("decode", "mixed") and over all of them: steps, seconds, achieved GB/s and TFLOP/s,
        each as a share of the peak, and the larger share (the speed of light of the kind's steps taken together)."""
        out = {}
        for kind in ("decode", "mixed", "all"):
            kinds = ("decode", "mixed") if kind == "all" else (kind,)
            seconds = sum(self.seconds[k] for k in kinds)
            if not seconds:
                continue
            moved, done = sum(self.bytes[k] for k in kinds) / seconds, sum(self.flops[k] for k in kinds) / seconds
            bandwidth, compute = moved / peaks.bytes_per_s, done / peaks.flops_per_s
            out[kind] = {"steps": sum(self.steps[k] for k in kinds), "seconds": round(seconds, 4),
                         "gb_per_s": float(f"{moved / 1e9:.4g}"), "tflop_per_s": float(f"{done / 1e12:.4g}"),
                         "bandwidth_of_peak": round(bandwidth, 4), "compute_of_peak": round(compute, 4),
                         "speed_of_light": round(max(bandwidth, compute), 4)}
        return out
