"""gpt-oss against transformers' GptOssForCausalLM on the same weights: continuous batching with preemption
on a tiny random model, and the really trained tiny-gptoss-pycode (float32 and bfloat16).
(Logits of tiny random configs, chunked prefill included: test_hf_parity.py's gpt-oss cases.)"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import REPO
from hf_reference import ATOL, hf_greedy, hf_logits, hf_model, max_diff, ms_greedy, prompt_logits, small_llm

from microscale import LLM, SamplingParams

TRAINED = REPO / "models" / "tiny-gptoss-pycode"
VALID_TEXT = REPO / "data" / "pycode-valid.txt"


def test_continuous_batching_with_preemption_matches_transformers(parity_model) -> None:
    path = parity_model("gpt_oss")
    rng = random.Random(7)
    # Lengths around the window (8) and across block boundaries; all submitted at once into a cache too
    # small for them together, so the scheduler preempts and resumes.
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in (5, 9, 23, 40, 17, 33)]
    num_blocks = 9
    block_bytes = 2 * 2 * 2 * 16 * 16 * 4  # layers, k/v, kv heads, head_dim, block size, float32
    llm = LLM(str(path), dtype="float32", max_model_len=128, max_num_seqs=6, max_num_batched_tokens=64,
              kv_cache_memory=num_blocks * block_bytes / (1 << 30))
    assert llm.engine.block_manager.num_blocks == num_blocks
    ours = ms_greedy(llm, prompts, 16)
    assert llm.engine.scheduler.num_preemptions > 0
    hf = hf_model(path)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(hf, prompt, 16)


@pytest.fixture(scope="module")
def trained_ids() -> list[int]:
    llm = small_llm(TRAINED)
    return llm.get_tokenizer().encode(VALID_TEXT.read_text()[:600])


def test_trained_model_matches_transformers_float32(trained_ids) -> None:
    llm, hf = small_llm(TRAINED), hf_model(TRAINED)
    assert max_diff(prompt_logits(llm, trained_ids), hf_logits(hf, trained_ids)) < ATOL
    prompts = [trained_ids[:20], trained_ids[:50]]
    for prompt, got in zip(prompts, ms_greedy(llm, prompts, 30)):
        assert got == hf_greedy(hf, prompt, 30)


def test_trained_model_text_matches_transformers_bfloat16() -> None:
    """The checkpoint's own dtype on both sides: the same greedy text. (Logits differ by a few bf16 steps:
    transformers runs the attention softmax in bf16, microscale in float32.)"""
    llm, hf = small_llm(TRAINED, dtype="bfloat16"), hf_model(TRAINED, torch.bfloat16)
    for text in ("import os\n", "def main():\n"):
        ids = llm.get_tokenizer().encode(text)
        out = llm.generate(text, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 24)
