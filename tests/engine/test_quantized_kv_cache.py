"""A quantised KV cache (int8, fp8; int4) holds ~4x (int4: ~5x at this head size) the float32 tokens in the same
memory, and every attention path reads exactly what it holds: greedy outputs are the same one request at a time
(persistent decode buffer), all at once, under preemption (paged decodes) and with chunked prefill. Tiny random
float32 model on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from microscale import LLM, SamplingParams

BLOCK = 16
MAX_MODEL_LEN = 160
_GIB = 1 << 30

_rng = random.Random(99)
# 16 token-id prompts of lengths 3..120 (ids >= 3: no special tokens), 8..32 greedy tokens each.
PROMPTS = [[_rng.randrange(3, 4096) for _ in range(3 + (i * 117) // 15)] for i in range(16)]
_rng.shuffle(PROMPTS)
PARAMS = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=8 + (i * 7) % 25) for i in range(16)]
DESCRIPTIONS = {"int8": "int8, per-token scales", "int4": "int4, per-token scales and zero points",
                "fp8": "fp8 e4m3, per-tensor scales"}


def make_llm(model_dir, kv_cache_quant, **kwargs) -> LLM:
    kwargs = {"dtype": torch.float32, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16, **kwargs}
    llm = LLM(model_dir, kv_cache_quant=kv_cache_quant, **kwargs)
    if kv_cache_quant:
        assert llm.engine.runner.kv_cache_description() == DESCRIPTIONS[kv_cache_quant]
    return llm


def run(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def float32_block_bytes(llm: LLM) -> int:
    cfg = llm.engine.model_config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * BLOCK * 4


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model()


@pytest.mark.parametrize("kv_cache_quant", ["int8", "int4", "fp8"])
def test_every_attention_path_gives_the_same_tokens(model_dir, kv_cache_quant):
    alone = make_llm(model_dir, kv_cache_quant, enable_prefix_caching=False)
    assert alone.engine.runner.attention_backend.decode_buffer is not None
    reference = [run(alone, [p], [sp])[0] for p, sp in zip(PROMPTS, PARAMS)]
    assert [len(t) for t in reference] == [sp.max_tokens for sp in PARAMS]

    # All at once, decodes from the persistent decode buffer.
    assert run(alone, PROMPTS, PARAMS) == reference

    # A cache of 12 blocks (one longest sequence takes 10): no decode buffer, decodes read the paged blocks,
    # and sequences are preempted and recomputed.
    gib = 12 * alone.engine.runner.kv_block_bytes(BLOCK) / _GIB
    paged = make_llm(model_dir, kv_cache_quant, kv_cache_memory=gib, max_num_seqs=6)
    assert paged.engine.block_manager.num_blocks == 12
    assert paged.engine.runner.attention_backend.decode_buffer is None
    assert run(paged, PROMPTS, PARAMS) == reference
    assert paged.engine.scheduler.num_preemptions > 0

    # Prompts prefilled in chunks of at most 16 tokens, attending to the cached part of themselves.
    chunked = make_llm(model_dir, kv_cache_quant, max_num_batched_tokens=16, max_num_seqs=3)
    assert run(chunked, PROMPTS, PARAMS) == reference


def test_quantised_cache_holds_about_four_times_the_tokens(model_dir):
    plain = make_llm(model_dir, None, kv_cache_memory=1.0 / 1024)  # 1 MiB
    fp32_blocks = plain.engine.block_manager.num_blocks
    assert fp32_blocks == _GIB // 1024 // float32_block_bytes(plain)
    assert plain.engine.runner.kv_cache_description() == "float32"
    int8 = make_llm(model_dir, "int8", kv_cache_memory=1.0 / 1024)
    assert int8.engine.block_manager.num_blocks >= 3.5 * fp32_blocks
    fp8 = make_llm(model_dir, "fp8", kv_cache_memory=1.0 / 1024)
    assert fp8.engine.block_manager.num_blocks == 4 * fp32_blocks
    # int4: a 16-value head vector takes 8 bytes and a bfloat16 scale and zero point, 12 in all (float32: 64)
    int4 = make_llm(model_dir, "int4", kv_cache_memory=1.0 / 1024)
    assert int4.engine.block_manager.num_blocks == fp32_blocks * 64 // 12
    # The quantised caches' logits stay near the float32 cache's (logits here: std ~0.8); fp8 (3 mantissa bits,
    # one scale per tensor) and int4 (16 levels) are the coarser.
    prompt = max(PROMPTS, key=len)
    expected = plain.engine.prompt_logits(prompt)
    for llm, tol in ((int8, 0.1), (fp8, 0.5), (int4, 0.5)):
        assert (llm.engine.prompt_logits(prompt) - expected).abs().max() < tol
