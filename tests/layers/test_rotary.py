"""RoPE inverse frequencies and attention factor: microscale vs transformers' own functions.

Each case is a raw config.json dict, read by microscale (`RopeConfig.from_hf`) and by transformers
(`LlamaConfig(**cfg)`, as `from_pretrained` does), in transformers-5 style (`rope_parameters`), transformers-4
style (`rope_theta` + `rope_scaling`, with `rope_type` or the older `type` key) and mixes of the two.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch

from microscale.config import ModelConfig, RopeConfig
from microscale.layers.rotary import RotaryEmbedding, rope_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

_SHAPE = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=131072,
)

_LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

# id -> (config.json entries on top of _SHAPE, the rope type both sides must agree on)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "default-none": ({}, "default"),
    "default-v4": ({"rope_theta": 500000.0, "rope_scaling": None}, "default"),
    "default-v5": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "default"),
    "default-v5-saved": (  # as transformers 5 writes config.json: both spellings, rope_scaling null
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "rope_theta": 1e6, "rope_scaling": None},
        "default",
    ),
    "linear-v4": ({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "linear"),
    "linear-v4-type-key": ({"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    "linear-v5": ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}, "linear"),
    "linear-v5-theta-outside": (
        {"rope_theta": 5000.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "linear"
    ),
    # Llama 3.1's own numbers.
    "llama3-v4": ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **_LLAMA3}}, "llama3"),
    "llama3-v5": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **_LLAMA3}}, "llama3"),
    "llama3-v5-no-original": (  # original_max_position_embeddings falls back to max_position_embeddings
        {"max_position_embeddings": 4096, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        }},
        "llama3",
    ),
    # Qwen2.5's documented long-context setting.
    "yarn-v4-qwen": (
        {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
        "yarn",
    ),
    "yarn-v5": (
        {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32768,
        }},
        "yarn",
    ),
    "yarn-v5-no-original": (
        {"max_position_embeddings": 4096,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}},
        "yarn",
    ),
    "yarn-attention-factor": (
        {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 4096,
            "attention_factor": 0.75,
        }},
        "yarn",
    ),
    "yarn-mscale": (  # DeepSeek style: attention factor from mscale / mscale_all_dim
        {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 0.707,
        }},
        "yarn",
    ),
    "yarn-betas-no-truncate": (
        {"rope_theta": 10000.0, "rope_scaling": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 16,
            "beta_slow": 2, "truncate": False,
        }},
        "yarn",
    ),
    "yarn-factor-below-one": (  # attention factor is 1 when not extending
        {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0, "original_max_position_embeddings": 8192,
        }},
        "yarn",
    ),
    # A transformers-5 config.json edited by hand the transformers-4 way (e.g. following Qwen's long-context
    # instructions): transformers lets rope_scaling replace rope_parameters.
    "mixed-scaling-overrides-default": (
        {
            "rope_theta": 1e6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        },
        "yarn",
    ),
    "mixed-scaling-overrides-factor": (
        {
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        },
        "linear",
    ),
    # A top-level original_max_position_embeddings (Phi-3 style) is used, even over the dict's own.
    "yarn-v4-original-outside": (
        {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
         "original_max_position_embeddings": 8192},
        "yarn",
    ),
    "yarn-v5-original-both": (
        {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4096,
        }, "original_max_position_embeddings": 8192},
        "yarn",
    ),
    "llama3-v4-original-outside": (
        {"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        }, "original_max_position_embeddings": 8192},
        "llama3",
    ),
}


def _hf_config(cfg: dict[str, Any]):
    kwargs = {k: v for k, v in copy.deepcopy(cfg).items() if k != "model_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaConfig(**kwargs)


def _hf_inv_freq(cfg: dict[str, Any]) -> tuple[torch.Tensor, float, str]:
    config = _hf_config(cfg)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":  # not in ROPE_INIT_FUNCTIONS: each model class computes it
        inv_freq, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq, float(factor), rope_type


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_matches_transformers(case: str) -> None:
    extra, rope_type = CASES[case]
    cfg = {**_SHAPE, **extra}
    expected, expected_factor, hf_type = _hf_inv_freq(cfg)
    assert hf_type == rope_type  # the case means what it says

    rope = RopeConfig.from_hf(copy.deepcopy(cfg))
    assert rope.rope_type == rope_type
    inv_freq, factor = rope_inv_freq(rope, cfg["head_dim"], cfg["max_position_embeddings"])
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-9)
    if rope_type in ("default", "linear", "llama3"):
        assert factor == 1.0


def test_v4_and_v5_spellings_agree() -> None:
    """The same scaling written both ways gives the same frequencies."""
    for v4, v5 in [("linear-v4", "linear-v5"), ("llama3-v4", "llama3-v5")]:
        a = rope_inv_freq(RopeConfig.from_hf({**_SHAPE, **CASES[v4][0]}), 128, 131072)
        b = rope_inv_freq(RopeConfig.from_hf({**_SHAPE, **CASES[v5][0]}), 128, 131072)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert a[1] == b[1]


def test_yarn_attention_factor_values() -> None:
    """Spot values of yarn's attention factor (0.1 ln(s) + 1), independent of transformers."""
    rope = RopeConfig.from_hf({**_SHAPE, **CASES["yarn-v5"][0]})
    assert rope_inv_freq(rope, 128, 131072)[1] == pytest.approx(0.1 * math.log(4.0) + 1)
    rope = RopeConfig.from_hf({**_SHAPE, **CASES["yarn-attention-factor"][0]})
    assert rope_inv_freq(rope, 128, 131072)[1] == 0.75


@pytest.mark.parametrize("case", ["default-v5", "llama3-v4", "yarn-v4-qwen", "yarn-mscale"])
def test_cos_sin_match_transformers(case: str) -> None:
    """The cos/sin tables microscale indexes equal what transformers' rotary module returns, attention factor
    included (checked through ModelConfig, as the model builds it)."""
    cfg = {**_SHAPE, **CASES[case][0]}
    model_cfg = ModelConfig.from_dict(copy.deepcopy(cfg))
    ours = RotaryEmbedding(model_cfg.head_dim, model_cfg.rope, 2048, model_cfg.max_position_embeddings)
    hf = LlamaRotaryEmbedding(_hf_config(cfg))
    positions = torch.tensor([0, 1, 7, 100, 1000, 2047])
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions[None])
    half = ours.rotary_dim // 2
    torch.testing.assert_close(ours.cos[positions], cos[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sin[positions], sin[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.cos[positions], cos[0, :, half:], rtol=1e-5, atol=1e-5)
