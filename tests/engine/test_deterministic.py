"""Deterministic mode (`deterministic=True`): a request's tokens and logprobs are bit-identical run alone, in a
batch of 8 and in a batch of 32, where chunked prefill cuts prompts at other places and a KV cache too small
for the batch preempts and recomputes sequences. Tiny random float32 models on CPU (float32 keeps every
last-bit difference visible; the plain mode differs in logprobs between these runs): Llama, and gpt-oss (MoE
experts over varying token counts, attention sinks, sliding windows)."""

from __future__ import annotations

import json
import random

import pytest

from microscale import LLM, SamplingParams
from microscale.config import EngineArgs

BLOCK = 16
NUM_BLOCKS = 40  # 32 requests of up to 140 + 8 tokens: far too few blocks for all at once

_rng = random.Random(11)
PROMPTS = [[_rng.randrange(3, 4000) for _ in range(3 + (i * 131) % 138)] for i in range(32)]
PARAMS = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8, logprobs=2)


@pytest.fixture(scope="module", params=["llama", "gpt_oss"])
def model_dir(request, tiny_model):
    return tiny_model(request.param)


def make_llm(model_dir, **kwargs) -> LLM:
    cfg = json.loads((model_dir / "config.json").read_text())
    block_bytes = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * BLOCK * 4
    return LLM(model_dir, dtype="float32", max_model_len=160, max_num_seqs=32, max_num_batched_tokens=64,
               block_size=BLOCK, kv_cache_memory=NUM_BLOCKS * block_bytes / (1 << 30), swap_space=0, **kwargs)


def run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def test_outputs_do_not_depend_on_the_batch(model_dir):
    llm = make_llm(model_dir, deterministic=True)
    alone = [run(llm, [p])[0] for p in PROMPTS[:8]]
    assert run(llm, PROMPTS[:8]) == alone
    together = run(llm, PROMPTS)
    assert llm.engine.scheduler.num_recomputed_preemptions > 0
    assert together[:8] == alone

    # The same model, computed as the default mode does: the same greedy tokens, logprobs to float32 rounding.
    reference = run(make_llm(model_dir), PROMPTS[:8])
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(alone, reference):
        assert tokens == ref_tokens
        for step, ref_step in zip(logprobs, ref_logprobs):
            for token, logprob in step.items():
                assert logprob.logprob == pytest.approx(ref_step[token].logprob, abs=1e-4)


def test_deterministic_mode_runs_the_torch_kernels_only():
    with pytest.raises(ValueError, match="kernel_backend='triton' cannot be combined"):
        EngineArgs(model="m", deterministic=True, kernel_backend="triton")
    assert EngineArgs(model="m", deterministic=True).kernel_backend == "auto"  # auto: the torch kernels
