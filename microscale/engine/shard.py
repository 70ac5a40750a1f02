"""One rank's share of the engine: its model shard, its ModelRunner and its KV cache. The LLMEngine (rank 0)
and every tensor-parallel worker build it the same way, so their collectives line up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from microscale.config import EngineArgs, resolve_dtype
from microscale.distributed.parallel_state import min_over_ranks
from microscale.engine.inputs import InputProcessor
from microscale.engine.model_runner import ModelRunner
from microscale.models.loader import load_model
from microscale.quant.scheme import QuantScheme

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_DEFAULT_CPU_KV_GIB = 4.0


@dataclass
class EngineShard:
    runner: ModelRunner
    num_blocks: int  # KV blocks every rank can hold (the block manager's size)
    dtype: torch.dtype
    quant: QuantScheme
    kv_cache_quant: str | None


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
    model, kv_scales = load_model(inputs.model_dir, cfg, dtype, device, max_model_len, quant, args.load_format,
                                  args.seed)
    logger.info("loaded %s (%s, %s) in %.1fs", cfg.architecture, dtype, device, time.perf_counter() - started)
    kv_cache_quant = args.kv_cache_quant or quant.checkpoint_kv_cache
    runner = ModelRunner(model, cfg, device, dtype, args.max_num_seqs, max_model_len, kv_cache_quant=kv_cache_quant,
                         kernel_backend=args.kernel_backend)
    _apply_checkpoint_kv_scales(runner, kv_scales, kv_cache_quant)
    num_blocks = min_over_ranks(_num_kv_blocks(args, runner, device, max_model_len))
    runner.allocate_kv_cache(num_blocks, args.block_size)
    return EngineShard(runner, num_blocks, dtype, quant, kv_cache_quant)


def _apply_checkpoint_kv_scales(runner: ModelRunner, kv_scales: dict, kv_cache_quant: str | None) -> None:
    """Static FP8 KV scales a pre-quantized checkpoint carries (used when its KV cache is FP8)."""
    if not kv_scales:
        return
    if kv_cache_quant != "fp8":
        logger.warning("the checkpoint's FP8 KV cache scales are unused (KV cache: %s)", kv_cache_quant or "none")
        return
    for layer, scales in kv_scales.items():
        runner.set_kv_scales(layer, scales["k_scale"], scales["v_scale"])


def _num_kv_blocks(args: EngineArgs, runner: ModelRunner, device: torch.device, max_model_len: int) -> int:
    block_bytes = runner.kv_block_bytes(args.block_size)
    blocks_per_seq = -(-max_model_len // args.block_size)
    if args.kv_cache_memory is not None:
        budget = args.kv_cache_memory * _GIB
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * args.cache_max_entry_count
    else:
        # No more than every sequence slot could ever use.
        budget = min(_DEFAULT_CPU_KV_GIB * _GIB, args.max_num_seqs * blocks_per_seq * block_bytes)
    num_blocks = int(budget // block_bytes)
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"The KV cache budget ({budget / _GIB:.3f} GiB = {num_blocks} blocks of {args.block_size} tokens) "
            f"cannot hold one sequence of max_model_len={max_model_len} tokens; raise kv_cache_memory / "
            f"cache_max_entry_count or lower max_model_len."
        )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.3f GiB (%s)",
        num_blocks, args.block_size, num_blocks * args.block_size, num_blocks * block_bytes / _GIB,
        runner.kv_cache_description(),
    )
    return num_blocks
