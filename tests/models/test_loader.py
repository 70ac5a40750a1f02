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
