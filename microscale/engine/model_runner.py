"""Turns a scheduled step into one flat batch of tensors, runs the model once, and returns the logits of
the sequences that sample a token this step.

A step travels as StepInputs (host lists): under tensor parallelism that is what rank 0's executor broadcasts,
and every rank builds its tensors from it and runs the same forward on its shard of the model; the runner
itself knows no ranks. Only the sampled ids leave the device.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from microscale.attention.metadata import AttentionMetadata, DecodeBatch, DecodeSequences, PrefillChunk
from microscale.attention.selector import select_attention_backend
from microscale.config import ModelConfig
from microscale.engine.block_manager import SwapPlan
from microscale.engine.compiled_forward import (
    CompiledForward,
    compile_cache_hits,
    compile_disabled_reason,
    inductor_cache_dir,
)
from microscale.engine.cuda_graphs import CudaGraph, DecodeGraphs
from microscale.engine.sampler import Sampler, SamplingBatch
from microscale.engine.scheduler import ScheduledChunk
from microscale.kernels.batch_invariant import batch_invariant_mode
from microscale.kernels.selector import resolve_kernel_backend
from microscale.layers.attention import Attention
from microscale.layers.moe import FusedMoE
from microscale.quant.base import QuantMethod, UnquantizedLinearMethod
from microscale.quant.kv_cache import make_kv_cache

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """One step's inputs as host lists, the flat batch holding the decodes first, then the prefill chunks.
    Under tensor parallelism this is what rank 0 broadcasts (no device tensors: each rank builds them on its own
    device with step_tensors)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]  # KV cache slot (block * block_size + offset) of each new token
    num_decodes: int
    decode_seq_ids: list[int]
    decode_tables: list[list[int]]  # the decodes' block tables
    prefills: list[tuple[int, int, list[int]]]  # (query_len, context_start, block_table) of each chunk
    rows: list[int] | None  # the rows whose logits are wanted; None: every token
    # Block copies made before the forward (every rank swaps its own shard): device -> host, then host -> device.
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)


class ModelRunner:
    def __init__(
        self, model: nn.Module, config: ModelConfig, device: torch.device, dtype: torch.dtype, max_num_seqs: int,
        max_model_len: int, kv_cache_quant: str | None = None, kernel_backend: str = "auto",
        shared_steps: bool = False, deterministic: bool = False,
    ) -> None:
        """shared_steps: other processes run every step beside this one (tensor parallelism), so decode steps
        run eagerly here too (the workers run each broadcast step eagerly)."""
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.deterministic = deterministic
        kernel_backend = "torch" if deterministic else kernel_backend
        self.attention_backend = backend = select_attention_backend(device, kernel_backend, kv_cache_quant,
                                                                    deterministic)
        # Norms, activations, quantized matmuls and MoE take the kernel family too (even where an FP8 KV cache
        # keeps attention on torch).
        self.kernel_family = family = resolve_kernel_backend(kernel_backend, device)
        for module in model.modules():
            if hasattr(module, "select_kernels"):
                module.select_kernels(family, device)
        # One cache per layer, in layer order; storage comes with allocate_kv_cache, once the engine has sized it.
        self.kv_caches = [  # this rank's KV heads under tensor parallelism
            make_kv_cache(kv_cache_quant, layer.num_kv_heads, layer.head_dim, dtype, device)
            for layer in self.attention_layers
        ]
        for layer, cache in zip(self.attention_layers, self.kv_caches):
            layer.backend = backend
            layer.kv_cache = cache
        self.block_size = 0
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.decode_graphs: DecodeGraphs | None = None
        self.compiled_forward: CompiledForward | None = None
        self.shared_steps = shared_steps
        self.scratch_block = 0

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one block of `block_size` tokens takes across all layers (keys and values as stored, with any
        per-token scales)."""
        return block_size * sum(cache.bytes_per_token() for cache in self.kv_caches)

    def kv_cache_description(self) -> str:
        """What the paged KV cache stores, for the log: e.g. "bfloat16" or "int8, per-token scales"."""
        return "; ".join(sorted({cache.describe() for cache in self.kv_caches}))

    def set_kv_scales(self, layer_index: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Static KV cache scales of one layer (float32; from calibration or the checkpoint): [kv_heads] for
        int8 / int4 (the layer then stores no per-token scales), [] or [1] for fp8. Before allocate_kv_cache, the
        memory saved goes to more blocks; later, what the cache already holds is re-quantised, but not what is
        swapped out: call it with no sequence preempted by swapping (the engine does, at start-up)."""
        self.kv_caches[layer_index].set_scales(k_scale, v_scale)
        self.attention_backend.kv_cache_changed()

    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        """num_blocks for the block manager; paged kernels get one more, a scratch block no sequence owns
        (padded rows of CUDA-graph decode steps write there). num_host_blocks: the swap space, in host memory."""
        self.scratch_block = num_blocks
        for cache in self.kv_caches:
            cache.allocate(num_blocks + (1 if self.attention_backend.graph_safe else 0), block_size)
            cache.allocate_host(num_host_blocks)
        self.block_size = block_size
        self.attention_backend.bind_kv_caches(self.kv_caches, num_blocks, block_size, self.max_num_seqs,
                                              self.max_model_len)

    @torch.inference_mode()
    def profile_step(self, num_tokens: int, block_size: int, sample: bool = True) -> None:
        """One dummy step as large as the scheduler makes, run for the memory it takes (before the KV cache is
        sized): `num_tokens` prompt tokens in chunks of at most max_model_len, the logits of as many rows as a
        step samples, and the sampler's costliest path on them. Every token writes into the one block of a
        placeholder cache, which allocate_kv_cache replaces. sample: False on a tensor-parallel worker (its
        logits are discarded)."""
        for cache in self.kv_caches:
            cache.allocate(1, block_size)
        self.block_size = block_size
        step = _profile_inputs(num_tokens, self.max_model_len, self.max_num_seqs, block_size)
        logits = self.forward_logits(step)
        if sample:
            Sampler()(logits, _costliest_sampling(len(step.rows), self.device))

    def prepare(
        self, chunks: list[ScheduledChunk], swaps: SwapPlan | None = None
    ) -> tuple[StepInputs, list[ScheduledChunk]]:
        """The step as host lists (decodes first, then prefill chunks; `rows`: the sampling chunks' last
        tokens, each followed by its drafts) and the chunks that sample, in the same order."""
        bs = self.block_size
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        step = StepInputs(input_ids=[], positions=[], slots=[], num_decodes=len(decodes),
                          decode_seq_ids=[c.seq.seq_id for c in decodes],
                          decode_tables=[c.seq.block_table for c in decodes], prefills=[], rows=[])
        if swaps is not None:
            step.swap_out, step.swap_in = swaps.out, swaps.into
        for c in decodes:
            seq, pos = c.seq, c.seq.num_computed_tokens
            step.input_ids.append(seq.token_ids[pos])
            step.positions.append(pos)
            step.slots.append(seq.block_table[pos // bs] * bs + pos % bs)
        for c in prefills:  # prompt chunks, and speculating sequences' last token with its drafts
            seq, start, n = c.seq, c.seq.num_computed_tokens, c.num_tokens
            step.prefills.append((n, start, seq.block_table))
            step.input_ids.extend(c.input_ids())
            span = range(start, start + n)
            step.positions.extend(span)
            table = seq.block_table
            step.slots.extend(table[p // bs] * bs + p % bs for p in span)
        sampling, row = [], -1
        for c in decodes + prefills:
            row += c.num_tokens
            if c.samples:  # the last token's logits, and each draft's (what verifying them reads)
                step.rows.extend(range(row - len(c.draft_token_ids), row + 1))
                sampling.append(c)
        return step, sampling

    def graphs_unavailable_reason(self) -> str | None:
        if self.shared_steps:
            return "tensor parallel workers run each broadcast step eagerly"
        if not self.attention_backend.graph_safe:
            return f"the {self.attention_backend.name} attention backend is not graph-safe (Triton's is)"
        if any(isinstance(m, FusedMoE) and not m.fused for m in self.model.modules()):
            return "the reference MoE reads expert counts back to the host (the fused MoE kernel does not)"
        return None

    def enable_decode_graphs(self, graph_type: type = CudaGraph) -> float:
        """Capture decode steps at bucketed batch sizes (after allocate_kv_cache); returns the seconds taken."""
        reason = self.graphs_unavailable_reason()
        if reason is not None:
            raise ValueError(f"Decode graphs cannot be used: {reason}.")
        self.decode_graphs = DecodeGraphs(self.model, self.max_num_seqs, self.max_model_len, self.block_size,
                                          self.config.num_key_value_heads, self.scratch_block, self.device, graph_type)
        with torch.inference_mode():
            return self.decode_graphs.capture()

    def compile_unavailable_reason(self) -> str | None:
        if self.device.type != "cpu":
            return "on a GPU, decode steps replay CUDA graphs of the Triton kernels instead"
        if self.shared_steps:
            return "tensor parallel ranks run each broadcast step eagerly"
        if self.deterministic:
            return "batch-invariant mode pads every matmul's rows, eagerly"
        if self.kernel_family != "torch":
            return f"the {self.kernel_family} kernels run under Triton's interpreter"
        if any(isinstance(m, FusedMoE) and not m.fused for m in self.model.modules()):
            return "the reference MoE reads expert counts back to the host (a graph break per layer)"
        quantized = sorted({type(m.quant_method).__name__ for m in self.model.modules()
                            if isinstance(getattr(m, "quant_method", None), QuantMethod)
                            and not isinstance(m.quant_method, UnquantizedLinearMethod)})
        if quantized:
            return (f"quantized weights ({', '.join(quantized)}) run a C kernel (decode) or dequantise through "
                    f"reused buffers (prefill) on CPU, neither of which traces")
        return compile_disabled_reason()

    def enable_compiled_forward(self) -> float | None:
        """Compile the forward (after allocate_kv_cache, and after anything that changes the model, such as
        calibration) with one warm-up step; returns the seconds taken, or None when the forward stays eager
        (the reason logged)."""
        reason = self.compile_unavailable_reason()
        if reason is not None:
            logger.info("the forward runs eagerly: %s", reason)
            return None
        started, cached_before = time.perf_counter(), compile_cache_hits()
        self.compiled_forward = CompiledForward(self.model, self.attention_layers)
        try:
            # A 2-token and a 1-token prompt chunk in block 0, which holds nothing yet (before any request): the
            # graphs of every larger step and of one token.
            for num_tokens in (2, 1):
                self.forward_logits(_profile_inputs(num_tokens, self.max_model_len, self.max_num_seqs,
                                                    self.block_size))
        except Exception as e:  # whatever the compiler fails on, the engine still works, eagerly
            self.compiled_forward = None
            logger.warning("the forward runs eagerly: compiling it failed (%s: %s)", type(e).__name__, e)
            return None
        seconds = time.perf_counter() - started
        source = "from the compile cache" if compile_cache_hits() > cached_before else "compiled from scratch"
        logger.info("compiled the forward (torch.compile, dynamic token count) in %.1fs, %s (%s)", seconds, source,
                    inductor_cache_dir())
        return seconds

    @torch.inference_mode()
    def forward_logits(self, step: StepInputs) -> torch.Tensor | None:
        """The step's block copies, then one forward and the logits of `step.rows` (None: no tokens, only
        copies). The tensors are built here, on this runner's device."""
        self._swap(step)
        if not step.input_ids:
            return None
        input_ids, positions, meta, rows = step_tensors(step, self.device, self.block_size)
        self.attention_backend.prepare(meta)
        with batch_invariant_mode(self.deterministic):
            hidden = None if self.decode_graphs is None else self.decode_graphs.run(input_ids, positions, meta)
            if hidden is None:
                forward = self.compiled_forward or self.model
                hidden = forward(input_ids, positions, meta)
            return self.model.compute_logits(hidden if rows is None else hidden[rows])

    def _swap(self, step: StepInputs) -> None:
        """The step's block copies, in every layer: swap-outs first (swap-ins may refill the blocks they free)."""
        if step.swap_out:
            blocks, host_blocks = zip(*step.swap_out)
            blocks, host_blocks = torch.tensor(blocks, device=self.device), torch.tensor(host_blocks)
            for cache in self.kv_caches:
                cache.swap_out(blocks, host_blocks)
        if step.swap_in:
            host_blocks, blocks = zip(*step.swap_in)
            host_blocks, blocks = torch.tensor(host_blocks), torch.tensor(blocks, device=self.device)
            for cache in self.kv_caches:
                cache.swap_in(host_blocks, blocks)


def step_tensors(
    step: StepInputs, device: torch.device, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
    """Input ids, positions, attention metadata and logit rows of `step` on `device`."""

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    slots, positions = tensor(step.slots), tensor(step.positions)
    prefills, start = [], step.num_decodes
    for query_len, context_start, table in step.prefills:
        prefills.append(PrefillChunk(start, query_len, context_start, tensor(table)))
        start += query_len
    decode = None
    if step.num_decodes:
        decode_positions = positions[: step.num_decodes]
        num_cached = step.positions[: step.num_decodes]
        decode = DecodeBatch(size=step.num_decodes, positions=decode_positions, length=max(num_cached) + 1,
                             sequences=DecodeSequences(step.decode_seq_ids, num_cached, step.decode_tables),
                             context_lens=decode_positions + 1)
    meta = AttentionMetadata(slot_blocks=slots // block_size, slot_offsets=slots % block_size, decode=decode,
                             prefills=prefills)
    rows = None if step.rows is None else tensor(step.rows)
    return tensor(step.input_ids), positions, meta, rows


def _profile_inputs(num_tokens: int, max_model_len: int, max_num_seqs: int, block_size: int) -> StepInputs:
    """The largest step: prompt chunks as long as a sequence can be (attention's memory grows with a chunk's
    length), sampling the last max_num_seqs rows; every slot in block 0."""
    num_tokens = min(num_tokens, max_num_seqs * max_model_len)  # no step holds more
    lengths = [min(max_model_len, num_tokens - start) for start in range(0, num_tokens, max_model_len)]
    positions = [p for n in lengths for p in range(n)]
    return StepInputs(
        input_ids=[0] * num_tokens, positions=positions, slots=[p % block_size for p in positions], num_decodes=0,
        decode_seq_ids=[], decode_tables=[], prefills=[(n, 0, [0] * -(-n // block_size)) for n in lengths],
        rows=list(range(num_tokens - min(max_num_seqs, num_tokens), num_tokens)),
    )


def _costliest_sampling(rows: int, device: torch.device) -> SamplingBatch:
    """Random sampling through every filter (top-k and top-p sort the whole vocabulary). Penalties and logprobs
    are left out: per-request extras, each a few more [rows, vocab] tensors, for the fraction's headroom."""

    def full(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((rows,), value, dtype=dtype, device=device)

    return SamplingBatch(temperature=full(1.0, torch.float32), all_greedy=False, top_k=full(50, torch.int64),
                         top_p=full(0.9, torch.float32), min_p=full(0.05, torch.float32), seeded={}, penalties=None,
                         blocked=None, num_logprobs=None)
