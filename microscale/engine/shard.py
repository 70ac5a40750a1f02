"""One rank's share of the engine, built in one call: its model shard, its ModelRunner, its KV cache (sized,
allocated, with the checkpoint's static scales) and, where they apply, its decode graphs. Rank 0's executor
and every tensor-parallel worker build it the same way, so their collectives line up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from microscale.config import EngineArgs, ModelConfig, resolve_dtype
from microscale.distributed.parallel_state import min_over_ranks, tp_rank, tp_size
from microscale.engine.inputs import InputProcessor
from microscale.engine.model_runner import ModelRunner
from microscale.engine.plan import (
    DeviceMemory,
    GpuMemory,
    blocks_per_seq,
    fixed_kv_budget,
    kv_cache_budget,
    plan_memory,
)
from microscale.engine.spec_decode.draft_config import draft_model_config
from microscale.models.loader import load_model
from microscale.quant.kv_cache import KV_CACHES, kv_scales_from_amax
from microscale.quant.scheme import QuantScheme

logger = logging.getLogger(__name__)

_GIB = 1 << 30


@dataclass
class EngineShard:
    runner: ModelRunner
    num_blocks: int  # KV blocks every rank can hold (the block manager's size)
    num_host_blocks: int  # blocks every rank's swap space holds
    dtype: torch.dtype
    quant: QuantScheme
    kv_cache_quant: str | None
    graph_capture_seconds: float | None  # None: decode steps run eagerly
    # Speculative decoding's draft model (method "draft"): its runner, with as many KV blocks as the target's.
    draft_runner: ModelRunner | None = None

    def compile_forwards(self, enforce_eager: bool) -> float | None:
        """Unless enforce_eager, compile the forward of the model and of any draft model where that applies
        (CPU); after anything that changes the model (calibration). Returns the seconds taken (None: eager)."""
        if enforce_eager:
            return None
        seconds = [s for runner in (self.runner, self.draft_runner) if runner is not None
                   and (s := runner.enable_compiled_forward()) is not None]
        return sum(seconds) if seconds else None

    def set_kv_amax(self, kv_amax: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Static KV cache scales from calibration's largest |k| and |v| per layer (a 16-bit cache takes none)."""
        if self.kv_cache_quant is None:
            return
        for layer, (k_amax, v_amax) in kv_amax.items():
            self.runner.set_kv_scales(layer, *kv_scales_from_amax(self.kv_cache_quant, k_amax, v_amax))


def build_shard(args: EngineArgs, inputs: InputProcessor, device: torch.device) -> EngineShard:
    cfg, max_model_len = inputs.model_config, inputs.max_model_len
    dtype = resolve_dtype(args.dtype, cfg.checkpoint_dtype, device)
    started = time.perf_counter()
    quant = QuantScheme.resolve(args.quantization, cfg.hf_config.get("quantization_config"))
    # Dummy weights come with dummy scales (benchmarks of shapes, not of accuracy).
    if quant.needs_calibration and args.calib_config is None and args.load_format != "dummy":
        raise ValueError(
            "FP8 with static activation scales needs calibration data: pass calib_config=CalibConfig("
            "calib_dataset=...) (CLI: --calib-data FILE), use fp8-dynamic, or load a pre-quantized FP8 checkpoint."
        )
    # Before anything of this shard is on the GPU: where its memory accounting starts.
    start = GpuSnapshot.take(device) if device.type == "cuda" else None
    if tp_rank() == 0:  # before any weight is read: a configuration that cannot fit fails now, not after loading
        plan = plan_memory(args, cfg, max_model_len, dtype, DeviceMemory.of(device), inputs.model_dir.name)
        logger.info("%s", plan.summary())
        if not plan.fits:
            raise ValueError(plan.refusal())
    model, kv_scales = load_model(inputs.model_dir, cfg, dtype, device, max_model_len, quant, args.load_format,
                                  args.seed)
    logger.info("loaded %s (%s, %s) in %.1fs", cfg.architecture, dtype, device, time.perf_counter() - started)
    kv_cache_quant = args.kv_cache_quant or quant.checkpoint_kv_cache
    runner = ModelRunner(model, cfg, device, dtype, args.max_num_seqs, max_model_len, kv_cache_quant=kv_cache_quant,
                         kernel_backend=args.kernel_backend, shared_steps=tp_size() > 1,
                         deterministic=args.deterministic)
    _apply_checkpoint_kv_scales(runner, kv_scales, kv_cache_quant)
    # Loaded before the KV cache is sized: its weights count as used memory, its cache blocks share the budget.
    draft = _build_draft_runner(args, cfg, dtype, device, max_model_len)
    num_blocks = min_over_ranks(_num_kv_blocks(args, runner, device, max_model_len, start, draft))
    num_host_blocks = min_over_ranks(_num_swap_blocks(args, runner, max_model_len))
    runner.allocate_kv_cache(num_blocks, args.block_size, num_host_blocks)
    if draft is not None:
        draft.allocate_kv_cache(num_blocks, args.block_size)
    graph_capture_seconds = _capture_decode_graphs(args, runner, device)
    if draft is not None:
        _capture_decode_graphs(args, draft, device)  # its k - 1 decode steps per proposal are launch-bound
    return EngineShard(runner, num_blocks, num_host_blocks, dtype, quant, kv_cache_quant, graph_capture_seconds,
                       draft)


def _build_draft_runner(
    args: EngineArgs, target: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> ModelRunner | None:
    """The draft model of speculative method "draft", unquantised, in the target's dtype, its KV cache in that
    dtype too (its decode steps replay CUDA graphs where the target's do)."""
    spec = args.speculative_config
    if spec is None or spec.method != "draft":
        return None
    model_dir, cfg = draft_model_config(spec, target, max_model_len)
    started = time.perf_counter()
    model, _ = load_model(model_dir, cfg, dtype, device, max_model_len, QuantScheme.resolve(None, None),
                          args.load_format, args.seed)
    logger.info("loaded the draft model %s (%s) in %.1fs", cfg.architecture, spec.model, time.perf_counter() - started)
    return ModelRunner(model, cfg, device, dtype, args.max_num_seqs, max_model_len, kernel_backend=args.kernel_backend,
                       deterministic=args.deterministic)


def _capture_decode_graphs(args: EngineArgs, runner: ModelRunner, device: torch.device) -> float | None:
    """On a GPU with the Triton kernels, unless enforce_eager: decode steps replay CUDA graphs."""
    if args.enforce_eager or device.type != "cuda":
        return None
    reason = runner.graphs_unavailable_reason()
    if reason is not None:
        logger.info("decode steps run eagerly: %s", reason)
        return None
    return runner.enable_decode_graphs()


def _num_swap_blocks(args: EngineArgs, runner: ModelRunner, max_model_len: int) -> int:
    """Blocks of the host swap space: swap_space GiB, but no more than max_num_seqs full sequences take."""
    swap_blocks = int(args.swap_space * _GIB // runner.kv_block_bytes(args.block_size))
    return min(swap_blocks, args.max_num_seqs * blocks_per_seq(max_model_len, args.block_size))


def _apply_checkpoint_kv_scales(runner: ModelRunner, kv_scales: dict, kv_cache_quant: str | None) -> None:
    """Static KV scales a pre-quantized checkpoint carries (used when the KV cache format takes them)."""
    if not kv_scales:
        return
    if not KV_CACHES.get(kv_cache_quant).checkpoint_scales:
        logger.warning("the checkpoint's FP8 KV cache scales are unused (KV cache: %s)", kv_cache_quant or "none")
        return
    for layer, scales in kv_scales.items():
        runner.set_kv_scales(layer, scales["k_scale"], scales["v_scale"])


@dataclass(frozen=True)
class GpuSnapshot:
    """A GPU's memory at one moment, in bytes."""

    free: int
    total: int
    allocated: int  # this process's torch tensors
    reserved: int  # torch's caching allocator: tensors and cached blocks

    @property
    def non_torch(self) -> int:
        """In use outside torch's allocator: other processes, and this one's CUDA context, NCCL, cuBLAS."""
        return self.total - self.free - self.reserved

    @classmethod
    def take(cls, device: torch.device) -> GpuSnapshot:
        free, total = torch.cuda.mem_get_info(device)
        return cls(free, total, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def _profile_gpu_memory(args: EngineArgs, runner: ModelRunner, device: torch.device, start: GpuSnapshot) -> GpuMemory:
    """Run the largest step the scheduler makes once, and measure what it took."""
    torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device)
    runner.profile_step(args.max_num_batched_tokens, args.block_size, sample=tp_rank() == 0)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()  # the step's freed blocks go back to the device, for mem_get_info to count as free
    end = GpuSnapshot.take(device)
    return GpuMemory(total=end.total, free_at_start=start.free, free=end.free, weights=held - start.allocated,
                     peak_activation=peak - held, non_torch=end.non_torch - start.non_torch)


def _gpu_kv_budget(args: EngineArgs, runner: ModelRunner, device: torch.device, start: GpuSnapshot) -> int:
    mem = _profile_gpu_memory(args, runner, device, start)
    budget = kv_cache_budget(mem, args.cache_max_entry_count, args.gpu_memory_utilization)
    if args.gpu_memory_utilization is None:
        rule = f"cache_max_entry_count={args.cache_max_entry_count} of the free memory less peak activations"
    else:
        rule = f"gpu_memory_utilization={args.gpu_memory_utilization} of the total less weights, activations, non-torch"
    logger.info(
        "GPU memory: total %.2f GiB, weights %.2f GiB, peak activations %.2f GiB (a step of %d tokens), non-torch "
        "%.2f GiB, free %.2f GiB; KV cache budget %.2f GiB (%s)",
        mem.total / _GIB, mem.weights / _GIB, mem.peak_activation / _GIB, args.max_num_batched_tokens,
        mem.non_torch / _GIB, mem.free / _GIB, budget / _GIB, rule,
    )
    return budget


def _num_kv_blocks(
    args: EngineArgs, runner: ModelRunner, device: torch.device, max_model_len: int, start: GpuSnapshot | None,
    draft: ModelRunner | None = None,
) -> int:
    """Blocks of the KV cache (and of the draft model's, as many, when there is one: a block's bytes are then
    the two together)."""
    block_bytes = runner.kv_block_bytes(args.block_size)
    if draft is not None:
        block_bytes += draft.kv_block_bytes(args.block_size)
    budget = fixed_kv_budget(args, device.type, max_model_len, block_bytes)
    if budget is None:
        budget = _gpu_kv_budget(args, runner, device, start)
    num_blocks = int(budget // block_bytes)
    if num_blocks < blocks_per_seq(max_model_len, args.block_size):
        raise ValueError(
            f"The KV cache budget ({budget / _GIB:.3f} GiB = {num_blocks} blocks of {args.block_size} tokens) "
            f"cannot hold one sequence of max_model_len={max_model_len} tokens; raise kv_cache_memory / "
            f"cache_max_entry_count / gpu_memory_utilization, or lower max_model_len (on a GPU, or "
            f"max_num_batched_tokens: its step's activations are reserved first)."
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.3f GiB (%s)",
        num_blocks, args.block_size, num_blocks * args.block_size, num_blocks * block_bytes / _GIB,
        runner.kv_cache_description() + ("" if draft is None else "; with the draft model's cache"),
    )
    return num_blocks
