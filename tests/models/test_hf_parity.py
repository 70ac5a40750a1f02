"""microscale vs Hugging Face transformers on the same weights (CPU).

For tiny random models of every supported architecture and RoPE scaling type, and for the bundled real model:
the logits at every prompt position agree within 1e-4 (float32), and greedy continuations are identical.
Prompt logits come from `LLMEngine.prompt_logits`, i.e. the engine's own ModelRunner prefill path over the
paged KV cache (whole, and in chunks that read earlier chunks back from the cache).
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLED_MODEL
from hf_reference import ATOL, hf_greedy, hf_logits, hf_model, max_diff, ms_greedy, prompt_logits, small_llm

from microscale import SamplingParams

transformers = pytest.importorskip("transformers")

# ~40 tokens with the bundled tokenizer: longer than the sliding windows and the chunk size below.
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
NEW_TOKENS = 20

_ROPE_THETA = 10000.0
# id -> (architecture, config overrides for the tiny_model fixture)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "mistral-window8": ("mistral", {"sliding_window": 8}),
    "qwen2-qkv-bias": ("qwen2", {}),
    # Qwen2's window applies from layer max_window_layers on: here layer 1 slides, layer 0 does not.
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3-qk-norm": ("qwen3", {}),
    "qwen3-bias": ("qwen3", {"attention_bias": True}),
    # Sinks, YaRN, window 8 on layer 0, 4 experts top-2 (see conftest); then top-1 of 8 and full-width MHA.
    "gpt-oss": ("gpt_oss", {}),
    "gpt-oss-top1-mha": ("gpt_oss", {"num_local_experts": 8, "num_experts_per_tok": 1, "num_key_value_heads": 4}),
    "llama-rope-linear": (
        "llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": _ROPE_THETA}},
    ),
    # head_dim 16: the 8 frequencies span the high (unchanged), medium (smoothed) and low (scaled) bands.
    "llama-rope-llama3": (
        "llama",
        {"rope_parameters": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": _ROPE_THETA,
        }},
    ),
    # attention factor 0.1 ln 4 + 1 scales cos/sin; the ramp mixes scaled and unscaled frequencies.
    "llama-rope-yarn": (
        "llama",
        {"rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": _ROPE_THETA,
        }},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_matches_transformers(case: str, parity_model) -> None:
    arch, overrides = CASES[case]
    path = parity_model(arch, **overrides)
    hf = hf_model(path)
    llm = small_llm(path)
    ids = llm.get_tokenizer().encode(PROMPT)
    assert 35 <= len(ids) <= 50

    expected = hf_logits(hf, ids)
    assert max_diff(prompt_logits(llm, ids), expected) < ATOL
    # Chunked prefill: chunks of 16 tokens on blocks of 8, each chunk attending to the cached earlier ones.
    chunked = small_llm(path, max_num_batched_tokens=16, block_size=8)
    assert max_diff(prompt_logits(chunked, ids), expected) < ATOL

    # Greedy decode, two prompts of different lengths batched together.
    prompts = [ids, ids[:13]]
    ours = ms_greedy(llm, prompts, NEW_TOKENS)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf, prompt, NEW_TOKENS)


def test_sliding_window_matters(parity_model) -> None:
    """Guard for the Mistral case: the window of 8 changes logits past position 8 (and only there), so the
    parity above really covers windowed attention."""
    ids = list(range(100, 140))
    windowed = hf_logits(hf_model(parity_model("mistral", sliding_window=8)), ids)
    full = hf_logits(hf_model(parity_model("mistral")), ids)
    assert max_diff(windowed[:8], full[:8]) < ATOL
    assert max_diff(windowed[8:], full[8:]) > 0.1
    llm = small_llm(parity_model("mistral", sliding_window=8))
    assert llm.engine.model_config.layer_windows == [8, 8]


def test_prompt_logits_rejects_bad_input(parity_model) -> None:
    llm = small_llm(parity_model("llama"))
    for bad in ([], [0] * 257, [4096]):
        with pytest.raises(ValueError):
            llm.engine.prompt_logits(bad)
    # The borrowed blocks are all returned.
    free = llm.engine.block_manager.num_free_blocks
    llm.engine.prompt_logits([1, 2, 3] * 20)
    assert llm.engine.block_manager.num_free_blocks == free


def test_bfloat16_close_to_transformers(tiny_model) -> None:
    """bf16 weights and activations on both sides. bf16 keeps 8 significant bits (relative step 2^-8 ~ 0.4%),
    and the two implementations round at different places (fused q/k/v and gate/up matmuls, attention kernels,
    accumulation order), so their logits differ by a few bf16 steps of the logits' magnitude, not by 1e-4:
    about 0.03 on logits up to ~3.8 here, i.e. 2 bf16 steps of 2^-6. The tolerance is 3% of the largest logit
    (~7 steps). Scale-free companion check: measured against transformers' float32 logits for the same
    (bf16-representable) weights, microscale's bf16 error is at most twice transformers' own bf16 error."""
    path = tiny_model("llama", dtype=torch.bfloat16)
    llm = small_llm(path, dtype="bfloat16")
    assert llm.engine.dtype == torch.bfloat16
    ids = llm.get_tokenizer().encode(PROMPT)
    ours = prompt_logits(llm, ids)
    expected = hf_logits(hf_model(path, torch.bfloat16), ids)
    reference = hf_logits(hf_model(path, torch.float32), ids)
    assert max_diff(ours, expected) < 0.03 * expected.abs().max().item()
    assert max_diff(ours, reference) < 2 * max_diff(expected, reference)
    # The predictions agree almost everywhere (bf16 may flip near-ties).
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


# ---- the bundled real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    """The bundled model (bf16 checkpoint) loaded in float32 by both."""
    return small_llm(BUNDLED_MODEL), hf_model(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)


REAL_PROMPTS = ["def fibonacci(n):", "import os\n"]


def test_bundled_model_logits(bundled) -> None:
    llm, hf = bundled
    ids = llm.get_tokenizer().encode(PROMPT + "\n\nclass Stack:\n    def __init__(self):\n")
    assert max_diff(prompt_logits(llm, ids), hf_logits(hf, ids)) < ATOL
    for text in REAL_PROMPTS:
        ids = llm.get_tokenizer().encode(text)
        assert max_diff(prompt_logits(llm, ids), hf_logits(hf, ids)) < ATOL


def test_bundled_model_greedy(bundled, hf_tokenizer) -> None:
    llm, hf = bundled
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = llm.generate(REAL_PROMPTS, params, use_tqdm=False)
    for text, out in zip(REAL_PROMPTS, outs):
        ids = hf_tokenizer(text)["input_ids"]
        expected = hf_greedy(hf, ids, 40)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == hf_tokenizer.decode(expected, skip_special_tokens=True)


TOKENIZER_TEXTS = [
    "def fibonacci(n):",
    "import os\n",
    "    return x  # trailing spaces   \n\n\tand a tab",
    "naïve café — ünïcödé, 中文, emoji 🐍",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
    "",
]


def test_bundled_tokenizer_matches_transformers(bundled, hf_tokenizer) -> None:
    tok = bundled[0].get_tokenizer()
    for text in TOKENIZER_TEXTS:
        expected = hf_tokenizer(text)["input_ids"]
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == hf_tokenizer.decode(expected, skip_special_tokens=True)
        assert tok.decode(expected, skip_special_tokens=False) == hf_tokenizer.decode(expected)


def test_bundled_chat_template_matches_transformers(bundled, hf_tokenizer) -> None:
    tok = bundled[0].get_tokenizer()
    conversations = [
        [{"role": "user", "content": "Write a function that reverses a list."}],
        [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "def hi():\n    return 'hi'"},
            {"role": "user", "content": "again, ünïcödé"},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
