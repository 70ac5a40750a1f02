"""Preemption by swapping changes nothing: a preempted sequence's KV blocks (scales included) go to host memory
and come back bit for bit, so its continuation uses the KV its own steps computed. In bfloat16, recomputing
instead (one prefill pass over prompt + output, a batch shape the original decode steps never had) rounds
differently and changes greedy picks; swapping must not. Tiny random bfloat16 model on CPU."""

from __future__ import annotations

import json
import random

import pytest
import torch

from microscale import LLM, SamplingParams
from microscale.engine.block_manager import SwapPlan
from microscale.quant.kv_cache import make_kv_cache

BLOCK = 16
NUM_BLOCKS = 24  # 15 requests of up to 155 tokens (10 blocks) each: many preemptions

_rng = random.Random(7)
PROMPTS = [[_rng.randrange(3, 4000) for _ in range(_rng.randrange(10, 60))] for _ in range(15)]
PARAMS = SamplingParams(temperature=0, ignore_eos=True, max_tokens=96)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    # Small weights: logits close together, so bfloat16 rounding differences show in greedy picks.
    return tiny_model("llama", torch.bfloat16, initializer_range=0.05)


def make_llm(model_dir, swap_space: float, kv_cache_quant: str | None = None) -> LLM:
    cfg = json.loads((model_dir / "config.json").read_text())
    per_token = make_kv_cache(kv_cache_quant, cfg["num_key_value_heads"], cfg["head_dim"], torch.bfloat16,
                              torch.device("cpu")).bytes_per_token()
    gib = NUM_BLOCKS * BLOCK * cfg["num_hidden_layers"] * per_token / (1 << 30)
    return LLM(model_dir, dtype="bfloat16", max_model_len=160, max_num_seqs=16, block_size=BLOCK,
               kv_cache_memory=gib, kv_cache_quant=kv_cache_quant, swap_space=swap_space)


def alone_and_together(llm: LLM) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy tokens of each request run alone, then of all run at once (same engine, same cache)."""
    alone = [llm.generate({"prompt_token_ids": p}, PARAMS, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert llm.engine.scheduler.num_preemptions == 0
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return alone, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_cache_quant", [None, "int8"], ids=["bf16-cache", "int8-cache"])
def test_swapped_preemption_keeps_every_output(model_dir, kv_cache_quant):
    llm = make_llm(model_dir, swap_space=1.0, kv_cache_quant=kv_cache_quant)
    assert llm.engine.block_manager.num_blocks == NUM_BLOCKS
    alone, together = alone_and_together(llm)
    sched = llm.engine.scheduler
    assert llm.engine.get_stats()["num_preemptions"] == sched.num_preemptions > 10
    assert sched.num_recomputed_preemptions == 0
    assert together == alone
    bm = llm.engine.block_manager
    assert len(bm.free_host_blocks) == bm.num_host_blocks  # the swap space is empty again

    # A step of copies only (every running sequence swapped out): no forward, block 0 copied out and into 1.
    runner = llm.engine.executor
    assert runner.execute([], SwapPlan(out=[(0, 0)], into=[(0, 1)])) == (None, [])
    for cache in llm.engine.runner.kv_caches:
        for stored in cache.block_tensors():
            assert torch.equal(stored[:, 1], stored[:, 0])


def test_recomputed_preemption_changes_outputs_here(model_dir):
    """The control: without a swap space the same run recomputes, and some greedy outputs change (what the
    test above would see without swapping)."""
    llm = make_llm(model_dir, swap_space=0)
    assert llm.engine.block_manager.num_host_blocks == 0
    alone, together = alone_and_together(llm)
    assert llm.engine.scheduler.num_recomputed_preemptions == llm.engine.scheduler.num_preemptions > 10
    assert together != alone


@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "fp8"])
def test_kv_cache_swap_round_trip_is_bit_exact(scheme):
    if scheme == "fp8" and getattr(torch, "float8_e4m3fn", None) is None:
        pytest.skip("no float8 in this torch")
    cache = make_kv_cache(scheme, 2, 8, torch.bfloat16, torch.device("cpu"))
    cache.allocate(6, 4)
    cache.allocate_host(3)
    if scheme in ("int8", "int4"):
        assert len(cache.block_tensors()) == 2  # values and their per-token scales (int4: and zero points)
    gen = torch.Generator().manual_seed(0)

    def fill(blocks: list[int]) -> None:
        slots = torch.tensor(blocks).repeat_interleave(4), torch.arange(4).repeat(len(blocks))
        k, v = (torch.randn(4 * len(blocks), 2, 8, generator=gen).to(torch.bfloat16) * 3 for _ in range(2))
        cache.write(k, v, *slots)

    fill([1, 4])
    stored = [t[:, [1, 4]].clone() for t in cache.block_tensors()]
    read = cache.read(torch.tensor([1, 4]))
    cache.swap_out(torch.tensor([1, 4]), torch.tensor([2, 0]))
    fill([1, 3, 4, 5])  # the freed blocks are reused meanwhile
    cache.swap_in(torch.tensor([2, 0]), torch.tensor([5, 3]))
    for before, after in zip(stored, cache.block_tensors()):
        assert torch.equal(after[:, [5, 3]].view(torch.uint8), before.view(torch.uint8))
    for before, after in zip(read, cache.read(torch.tensor([5, 3]))):
        assert torch.equal(after, before)
