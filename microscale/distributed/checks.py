"""Whether a model can be split over N ranks: checked before any process starts, with a message that says
what does not divide."""

from __future__ import annotations

from microscale.config import EngineArgs, ModelConfig
from microscale.quant.scheme import QuantScheme


def check_tensor_parallel(cfg: ModelConfig, args: EngineArgs) -> None:
    n = args.tensor_parallel_size
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {n}.")
    if n == 1:
        return
    problems = []
    if cfg.num_attention_heads % n:
        problems.append(f"{cfg.num_attention_heads} attention heads")
    kv = cfg.num_key_value_heads
    if (kv >= n and kv % n) or (kv < n and n % kv):
        problems.append(f"{kv} KV heads (need a multiple of {n}, or a divisor of it to replicate them)")
    whole_experts = args.enable_expert_parallel and cfg.num_experts > 0
    if whole_experts and cfg.num_experts % n:
        problems.append(f"{cfg.num_experts} experts (expert parallel)")
    if not whole_experts and cfg.intermediate_size % n:
        problems.append(f"intermediate size {cfg.intermediate_size}")
    quant = QuantScheme.resolve(args.quantization, cfg.hf_config.get("quantization_config"))
    problems += quant.tensor_parallel_problems(cfg, n, whole_experts)
    if problems:
        raise ValueError(f"tensor_parallel_size={n} does not divide this model: " + "; ".join(problems) + ".")
    if args.calib_config is not None:
        raise ValueError("Calibration runs on one device: calibrate with tensor_parallel_size=1 and save the model "
                         "(`microscale quantize`), then load that checkpoint with tensor parallelism.")
