"""Loading: sharded safetensors, the real-model configs kept in the repo (shapes and parameter counts on the
meta device), and dummy weights from a config-only folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BUNDLED_MODEL, REPO, build_tiny_model

from microscale import LLM, SamplingParams
from microscale.config import ModelConfig
from microscale.models.registry import get_model_class
from microscale.quant.scheme import QuantScheme

CONFIGS = REPO / "configs" / "models"
# Parameter counts the model cards state (embeddings included, tied ones once).
PUBLISHED_PARAMS = {
    "Llama-3.1-8B": 8.03e9,
    "Qwen2.5-7B": 7.62e9,
    "Qwen3-8B": 8.19e9,
    "Qwen3-0.6B": 0.596e9,
    "SmolLM2-135M": 0.1345e9,
    "gpt-oss-20b": 20.91e9,  # built unquantized here: every expert weight counted once
    "gpt-oss-120b": 116.83e9,
}


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: Path) -> None:
    single = build_tiny_model(tmp_path / "single", "llama")
    sharded = build_tiny_model(tmp_path / "sharded", "llama", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = list(range(5, 30))
    logits = [LLM(str(p), dtype="float32").engine.prompt_logits(ids) for p in (single, sharded)]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_repo_model_configs_build_at_real_size(name: str) -> None:
    cfg = ModelConfig.from_file(CONFIGS / name / "config.json")
    with torch.device("meta"):
        model = get_model_class(cfg.architecture)(cfg, torch.bfloat16, 128, QuantScheme())
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_llama31_config_uses_llama3_rope() -> None:
    cfg = ModelConfig.from_file(CONFIGS / "Llama-3.1-8B" / "config.json")
    assert cfg.rope.rope_type == "llama3" and cfg.rope.params["factor"] == 8.0
    assert cfg.num_key_value_heads == 8 and cfg.head_dim == 128


def test_dummy_weights_from_a_config_only_folder(tmp_path: Path) -> None:
    shutil.copy(CONFIGS / "SmolLM2-135M" / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", tokenizer=str(BUNDLED_MODEL), max_model_len=64, dtype="bfloat16")
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    embed = llm.engine.runner.model.model.embed_tokens.weight
    assert embed.shape == (json.loads((tmp_path / "config.json").read_text())["vocab_size"], 576)
    assert 0.01 < embed.float().std().item() < 0.05  # random, not zeros or garbage


def test_dummy_mxfp4_gpt_oss(tmp_path: Path) -> None:
    """A config-only gpt-oss folder whose config says mxfp4 (like the real ones): random packed experts."""
    config = json.loads((REPO / "models" / "tiny-gptoss-pycode" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), load_format="dummy", tokenizer=str(BUNDLED_MODEL), max_model_len=64)
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    assert experts.w13_blocks.dtype == torch.uint8 and experts.w13_blocks.shape == (8, 512, 8, 16)
    weights = experts.quant_method.expert_weights(experts, 0, torch.float32)[0]
    assert 0.01 < weights.std().item() < 0.05
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_gpt_oss_20b_config() -> None:
    cfg = ModelConfig.from_file(CONFIGS / "gpt-oss-20b" / "config.json")
    assert cfg.num_experts == 32 and cfg.num_experts_per_tok == 4 and cfg.checkpoint_quant == "mxfp4"
    assert cfg.attention_sinks and cfg.layer_windows[:2] == [128, None]
    assert cfg.rope.rope_type == "yarn" and cfg.rope.params["factor"] == 32.0
