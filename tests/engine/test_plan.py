"""The "will it fit" planner against what the engine really builds: predicted weight bytes against the resident
parameters and buffers of dummy-loaded models (Llama-3.1-8B, Qwen3-8B and gpt-oss-20b shapes with fewer layers,
a smaller vocabulary and narrower widths; bf16, FP8, MXFP4), KV blocks against the engine's allocation, and a
start-up that cannot fit refused before the loader is called."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from microscale.cli import main
from microscale.config import EngineArgs, ModelConfig
from microscale.engine import shard
from microscale.engine.inputs import InputProcessor
from microscale.engine.plan import DeviceMemory, plan_memory, resident_bytes
from microscale.models.loader import load_model
from microscale.quant.scheme import QuantScheme

GIB = 1 << 30
CONFIGS = Path(__file__).parents[2] / "configs" / "models"
ROOMY_CPU = DeviceMemory("cpu", "cpu", 64 * GIB, 64 * GIB)
# Narrower copies of the real shapes (heads, head_dim, GQA ratio kept where they divide), two layers.
SHRINK = {
    "Llama-3.1-8B": {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 4,
                     "num_key_value_heads": 1},
    "Qwen3-8B": {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 4, "num_key_value_heads": 1},
    "gpt-oss-20b": {"hidden_size": 512, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
                    "num_local_experts": 8},
}


def shrunk_config(name: str) -> ModelConfig:
    raw = json.loads((CONFIGS / name / "config.json").read_text())
    raw.update(SHRINK[name], num_hidden_layers=2, vocab_size=1024)
    if "layer_types" in raw:
        raw["layer_types"] = raw["layer_types"][:2]
    return ModelConfig.from_dict(raw)


@pytest.mark.parametrize("name", list(SHRINK))
@pytest.mark.parametrize("quant", [None, "fp8", "mxfp4"])
def test_predicted_weights_are_within_3_percent_of_the_resident_ones(name, quant):
    cfg = shrunk_config(name)
    args = EngineArgs(model=name, quantization=quant, load_format="dummy", max_model_len=256)
    plan = plan_memory(args, cfg, 256, torch.bfloat16, ROOMY_CPU)
    model, _ = load_model(Path("."), cfg, torch.bfloat16, torch.device("cpu"), 256,
                          QuantScheme.resolve(quant, cfg.hf_config.get("quantization_config")), "dummy")
    resident = resident_bytes(model)
    assert abs(plan.weight_bytes - resident) <= 0.03 * resident
    stored = {precision for parts in plan.weights.values() for precision in parts}
    if quant == "mxfp4" or name == "gpt-oss-20b":  # gpt-oss's experts stay MXFP4 under every choice
        assert {"mxfp4 blocks", "e8m0 scales"} <= stored
    assert ("fp8" in stored) == (quant == "fp8")


def test_tensor_parallel_halves_the_sharded_parts():
    cfg = shrunk_config("Llama-3.1-8B")
    one, two = (plan_memory(EngineArgs(model="m", tensor_parallel_size=n, max_model_len=256), cfg, 256,
                            torch.bfloat16, ROOMY_CPU) for n in (1, 2))
    assert two.weights["mlp"]["bfloat16"] * 2 == one.weights["mlp"]["bfloat16"]
    assert two.weights["embeddings"]["bfloat16"] * 2 == one.weights["embeddings"]["bfloat16"]
    assert two.kv_bytes_per_token == one.kv_bytes_per_token  # one KV head: replicated on both ranks


@pytest.fixture(scope="module")
def cpu_args(tiny_model):
    return EngineArgs(model=str(tiny_model()), dtype="float32", max_model_len=64, max_num_seqs=3,
                      max_num_batched_tokens=64, kv_cache_memory=0.002, device="cpu")


@pytest.mark.parametrize("kv", [None, "int8", "fp8"])
@pytest.mark.parametrize("budget", [0.002, None])
def test_planned_kv_blocks_are_the_engines(cpu_args, kv, budget):
    args = dataclasses.replace(cpu_args, kv_cache_quant=kv, kv_cache_memory=budget)
    inputs = InputProcessor(args)
    built = shard.build_shard(args, inputs, torch.device("cpu"))
    plan = plan_memory(args, inputs.model_config, 64, torch.float32, DeviceMemory.of(torch.device("cpu")))
    assert plan.kv_bytes_per_token * args.block_size == built.runner.kv_block_bytes(args.block_size)
    assert plan.num_blocks == built.num_blocks
    assert plan.fits and plan.full_sequences == plan.num_blocks // 4


def test_a_draft_model_is_planned_with_its_weights_and_cache(cpu_args):
    """Speculative decoding's draft model (here the target itself): its weights are counted, and its KV cache
    shares the budget with as many blocks as the target's."""
    args = dataclasses.replace(cpu_args, speculative_config={"method": "draft", "model": cpu_args.model,
                                                             "num_speculative_tokens": 2})
    inputs = InputProcessor(args)
    built = shard.build_shard(args, inputs, torch.device("cpu"))
    plan = plan_memory(args, inputs.model_config, 64, torch.float32, DeviceMemory.of(torch.device("cpu")))
    block_bytes = built.runner.kv_block_bytes(16) + built.draft_runner.kv_block_bytes(16)
    assert plan.kv_bytes_per_token * 16 == block_bytes and plan.num_blocks == built.num_blocks
    assert sum(plan.weights["draft model"].values()) == resident_bytes(built.draft_runner.model)
    assert plan.weight_bytes == resident_bytes(built.runner.model) + resident_bytes(built.draft_runner.model)


def test_a_start_that_cannot_fit_is_refused_before_any_weight_is_read(monkeypatch, cpu_args):
    def never(*args, **kwargs):
        raise AssertionError("the loader was called")

    monkeypatch.setattr(shard, "load_model", never)
    per_token = plan_memory(cpu_args, InputProcessor(cpu_args).model_config, 64, torch.float32,
                            ROOMY_CPU).kv_bytes_per_token
    # Room for 40 tokens: two blocks of 16, not one 64-token sequence.
    args = dataclasses.replace(cpu_args, kv_cache_memory=40 * per_token / GIB)
    with pytest.raises(ValueError, match=r"cannot fit .* largest that fit are max_model_len=32 with max_num_seqs=1"):
        shard.build_shard(args, InputProcessor(args), torch.device("cpu"))


def test_a_gpu_too_small_for_the_weights_is_refused():
    cfg = shrunk_config("Qwen3-8B")
    plan = plan_memory(EngineArgs(model="m", max_model_len=256), cfg, 256, torch.bfloat16,
                       DeviceMemory("cuda", "tiny GPU", GIB // 2, GIB // 2))
    assert not plan.fits and plan.num_blocks == 0
    assert "0.50 GiB free on tiny GPU" in plan.verdict()
    assert "use more tensor-parallel ranks" in plan.refusal()
    roomy = plan_memory(EngineArgs(model="m", max_model_len=256), cfg, 256, torch.bfloat16,
                        DeviceMemory("cuda", "H100", 80 * GIB, 80 * GIB))
    assert roomy.fits and roomy.cuda_graphs > 0 and roomy.num_blocks > 1000


def test_plan_cli_json_and_exit_status(tiny_model, capsys):
    model = str(tiny_model())
    main(["plan", model, "--device", "H100", "--max-model-len", "64", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "H100" and plan["fits"] and plan["kv_tokens"] > 0
    assert plan["weight_bytes"] == sum(sum(parts.values()) for parts in plan["weights"].values())
    with pytest.raises(SystemExit) as exit_:
        main(["plan", model, "--device", "cpu", "--kv-cache-memory", "0.00001", "--max-model-len", "64"])
    assert exit_.value.code == 1
    assert "verdict: does not fit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", model, "--device", "Z80"])
    assert "Unknown device 'Z80'" in capsys.readouterr().err
