"""Shared fixtures: tiny random Hugging Face models of each supported architecture, written to disk by
transformers itself (so loading them exercises the real checkpoint format), with the bundled tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "models" / "tiny-llama-pycode"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]

_BASE = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # wide enough that greedy choices are not near-ties
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def _hf_config(arch: str, overrides: dict):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    kwargs = dict(_BASE)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return classes[arch](**kwargs)


def build_tiny_model(path: Path, arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a random `arch` model with transformers' save_pretrained, plus the bundled tokenizer."""
    import transformers

    torch.manual_seed(0)
    config = _hf_config(arch, overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(BUNDLED_MODEL / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model("qwen3", tie_word_embeddings=True) -> folder; built once per distinct spec."""
    built: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, **overrides) -> Path:
        key = (arch, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(arch), arch, dtype, **overrides)
        return built[key]

    return make
