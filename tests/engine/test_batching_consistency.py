"""Scheduling must not change what a request generates: the same 32 prompts of mixed lengths give the same
greedy tokens (and seeded samples) one at a time, all at once, under preemption, with chunked prefill, and
with prefix caching on or off. Tiny random float32 model on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from microscale import LLM, SamplingParams

BLOCK = 16
MAX_MODEL_LEN = 160

_rng = random.Random(1234)
# 32 token-id prompts of lengths 3..120 (ids >= 3: no special tokens).
PROMPTS = [[_rng.randrange(3, 4096) for _ in range(3 + (i * 117) // 31)] for i in range(32)]
_rng.shuffle(PROMPTS)
GREEDY = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=1 + (i * 7) % 24) for i in range(32)]
# A few seeded, sampled requests (two samples each) ride along in every configuration.
SAMPLED_PROMPTS = [PROMPTS[i] for i in (0, 9, 17, 30)]
SAMPLED = [
    SamplingParams(n=2, temperature=0.8, top_p=0.95, seed=100 + i, ignore_eos=True, max_tokens=6 + 3 * i)
    for i in range(4)
]

# A long shared prefix (5 full blocks) with different tails.
_PREFIX = [_rng.randrange(3, 4096) for _ in range(5 * BLOCK)]
PREFIX_PROMPTS = [_PREFIX + [_rng.randrange(3, 4096) for _ in range(1 + 3 * i)] for i in range(8)]
PREFIX_PARAMS = SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)


def kv_block_bytes(model_dir, block_size=BLOCK) -> int:
    import json

    cfg = json.loads((model_dir / "config.json").read_text())
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * block_size * 4


def make_llm(model_dir, **kwargs) -> LLM:
    kwargs = {"dtype": torch.float32, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 64, **kwargs}
    return LLM(model_dir, **kwargs)


def run(llm: LLM, prompts, params) -> list[list[list[int]]]:
    """Token ids of every sample of every request, all submitted at once."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def run_all(llm: LLM) -> tuple[list, list]:
    return run(llm, PROMPTS + SAMPLED_PROMPTS, GREEDY + SAMPLED), run(llm, PREFIX_PROMPTS, PREFIX_PARAMS)


def record_steps(llm: LLM) -> list[list[tuple[str, int]]]:
    """Spy on the scheduler: for each step, (request id, tokens computed) of every scheduled chunk."""
    steps: list[list[tuple[str, int]]] = []
    scheduler = llm.engine.scheduler
    schedule = scheduler.schedule

    def spy():
        chunks = schedule()
        steps.append([(c.seq.request.request_id, c.num_tokens) for c in chunks])
        return chunks

    scheduler.schedule = spy
    return steps


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model_dir):
    """Every request alone (one at a time, prefix caching off): the outputs all other runs must reproduce."""
    llm = make_llm(model_dir, enable_prefix_caching=False)
    assert llm.engine.runner.attention_backend.cpu_attention is not None
    main = [run(llm, [p], [sp])[0] for p, sp in zip(PROMPTS + SAMPLED_PROMPTS, GREEDY + SAMPLED)]
    prefix = [run(llm, [p], [PREFIX_PARAMS])[0] for p in PREFIX_PROMPTS]
    assert llm.engine.get_stats()["prefix_cache_hits"] == 0
    assert [len(o[0]) for o in main[:32]] == [sp.max_tokens for sp in GREEDY]
    for o, sp in zip(main[32:], SAMPLED):
        assert len(o) == 2 and all(len(s) == sp.max_tokens for s in o)
    return main, prefix


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_all_at_once(model_dir, reference, prefix_caching):
    llm = make_llm(model_dir, enable_prefix_caching=prefix_caching)
    steps = record_steps(llm)
    main, prefix = run_all(llm)
    assert main == reference[0]
    assert prefix == reference[1]
    assert llm.engine.scheduler.num_preemptions == 0
    assert max(len(s) for s in steps) > 32  # really batched
    hits = llm.engine.get_stats()["prefix_cache_hits"]
    assert (hits > 0) == prefix_caching


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption(model_dir, reference, prefix_caching):
    # Room for 14 blocks: one longest sequence (10 blocks) and not much more, so decodes run out of blocks.
    num_blocks = 14
    gib = num_blocks * kv_block_bytes(model_dir) / (1 << 30)
    llm = make_llm(model_dir, kv_cache_memory=gib, max_num_seqs=8, enable_prefix_caching=prefix_caching)
    assert llm.engine.block_manager.num_blocks == num_blocks
    main, prefix = run_all(llm)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.get_stats()["num_preemptions"] == llm.engine.scheduler.num_preemptions
    assert main == reference[0]
    assert prefix == reference[1]


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_chunked_prefill(model_dir, reference, prefix_caching):
    llm = make_llm(model_dir, max_num_batched_tokens=16, max_num_seqs=3, enable_prefix_caching=prefix_caching)
    steps = record_steps(llm)
    main, prefix = run_all(llm)
    assert main == reference[0]
    assert prefix == reference[1]
    assert all(sum(n for _, n in step) <= 16 for step in steps)
    assert all(len(step) <= 3 for step in steps)
    # Prompts longer than the budget were split over several steps.
    chunks_per_request: dict[str, int] = {}
    for step in steps:
        for rid, n in step:
            if n > 1:
                chunks_per_request[rid] = chunks_per_request.get(rid, 0) + 1
    assert max(chunks_per_request.values()) >= 120 // 16


def test_preemption_with_chunked_prefill(model_dir, reference):
    gib = 14 * kv_block_bytes(model_dir) / (1 << 30)
    llm = make_llm(model_dir, kv_cache_memory=gib, max_num_batched_tokens=24, max_num_seqs=6)
    main, prefix = run_all(llm)
    assert llm.engine.scheduler.num_preemptions > 0
    assert main == reference[0]
    assert prefix == reference[1]


def test_shared_prefix_is_computed_once(model_dir, reference):
    llm = make_llm(model_dir, enable_prefix_caching=True)
    steps = record_steps(llm)
    first = llm.generate({"prompt_token_ids": PREFIX_PROMPTS[3]}, PREFIX_PARAMS, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    stats = llm.engine.get_stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (len(PREFIX_PROMPTS[3]), 0)

    steps.clear()
    second_prompt = PREFIX_PROMPTS[6]
    second = llm.generate({"prompt_token_ids": second_prompt}, PREFIX_PARAMS, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == reference[1][6][0]
    cached = len(_PREFIX)
    assert second.num_cached_tokens == cached
    # Only the new tokens were computed for the prompt: one chunk of len - cached, then one-token decodes.
    assert steps[0] == [(second.request_id, len(second_prompt) - cached)]
    assert all(step == [(second.request_id, 1)] for step in steps[1:])
    stats = llm.engine.get_stats()
    assert stats["prefix_cache_hits"] == cached
    assert stats["prefix_cache_queries"] == len(PREFIX_PROMPTS[3]) + len(second_prompt)

    # After a reset nothing is found; once one request has computed the prefix, all requests sharing it hit.
    llm.reset_prefix_cache()
    llm.generate({"prompt_token_ids": PREFIX_PROMPTS[0]}, PREFIX_PARAMS, use_tqdm=False)
    assert llm.engine.get_stats()["prefix_cache_hits"] == cached  # nothing new found after the reset
    outs = llm.generate([{"prompt_token_ids": p} for p in PREFIX_PROMPTS], PREFIX_PARAMS, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == reference[1]
    assert [o.num_cached_tokens for o in outs] == [cached] * len(PREFIX_PROMPTS)
    assert llm.engine.get_stats()["prefix_cache_hits"] == (1 + len(PREFIX_PROMPTS)) * cached


def test_whole_prompt_cached_still_computes_its_last_block(model_dir):
    """A block-aligned prompt seen before: all but its last block come from the cache (the last token's
    logits are needed), and the output is the same."""
    llm = make_llm(model_dir, enable_prefix_caching=True)
    prompt = {"prompt_token_ids": _PREFIX}
    steps = record_steps(llm)
    first = llm.generate(prompt, PREFIX_PARAMS, use_tqdm=False)[0]
    steps.clear()
    again = llm.generate(prompt, PREFIX_PARAMS, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.num_cached_tokens == len(_PREFIX) - BLOCK
    assert steps[0] == [(again.request_id, BLOCK)]
