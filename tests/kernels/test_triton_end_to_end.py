"""Whole models through the Triton kernels (interpreted on CPU) against the torch reference path: the same
greedy tokens and near-identical prompt logits, for Llama and gpt-oss (sinks, sliding window, MoE), with a
quantised KV cache, chunked prefill with prefix-cache hits, and decode steps replayed through the
CUDA-graph machinery's static buffers."""

from __future__ import annotations

import pytest
import torch

from microscale import LLM, SamplingParams
from microscale.engine.cuda_graphs import EagerReplay, bucket_sizes
from microscale.kernels.selector import resolve_kernel_backend

KNOBS = dict(dtype="float32", max_model_len=128, max_num_seqs=4, kv_cache_memory=0.01)
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8], [5, 17, 99, 3, 250, 42, 7, 61, 70, 71, 72, 90, 91]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _pair(model, **knobs) -> tuple[LLM, LLM]:
    knobs = {**KNOBS, **knobs}
    return LLM(str(model), kernel_backend="torch", **knobs), LLM(str(model), kernel_backend="triton", **knobs)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize(("arch", "kv_cache_quant"), [
    ("llama", None), ("llama", "int8"), ("llama", "int4"), ("llama", "fp8"), ("gpt_oss", None), ("qwen3", None),
])
def test_triton_path_matches_the_torch_path(tiny_model, arch, kv_cache_quant):
    reference, triton = _pair(tiny_model(arch), kv_cache_quant=kv_cache_quant)
    assert triton.engine.runner.attention_backend.name == "triton"
    assert getattr(triton.engine.runner.attention_backend, "decode_buffer", None) is None  # decodes read paged blocks
    ids = PROMPTS[2] * 3
    tolerance = 1e-4 if kv_cache_quant is None else 5e-2  # quantised: rounding at different points
    assert (reference.engine.prompt_logits(ids) - triton.engine.prompt_logits(ids)).abs().max() < tolerance
    assert _tokens(triton) == _tokens(reference)


def test_chunked_prefill_and_prefix_hits_through_triton(tiny_model):
    """Chunks of 5 tokens continue cached prefixes; the third prompt starts with the first (a prefix-cache hit)."""
    reference, triton = _pair(tiny_model("llama"), max_num_batched_tokens=5, block_size=4)
    assert _tokens(triton) == _tokens(reference)
    assert triton.engine.block_manager.stats.hits > 0


def test_decode_graph_buffers_replay_like_eager(tiny_model):
    reference, triton = _pair(tiny_model("llama"), max_num_seqs=3)
    triton.engine.runner.enable_decode_graphs(EagerReplay)
    graphs = triton.engine.runner.decode_graphs
    assert sorted(graphs.graphs) == [1, 2, 3]
    replays = []
    original = graphs.run

    def counting_run(*args):
        hidden = original(*args)
        replays.append(hidden is not None)
        return hidden

    graphs.run = counting_run
    assert _tokens(triton) == _tokens(reference)  # 3 prompts, then 2, then 1 left: padded buckets are used
    assert any(replays) and not all(replays)  # decode steps replayed, prefill steps ran eagerly


def test_speculative_verification_through_triton(tiny_model):
    """Draft-model speculation on the Triton path, the target's and the draft's decodes replayed through the graph
    buffers: the verification chunks (a sequence's last token and its drafts) run eagerly through the prefill kernel
    with a cached context, the draft's catch-up chunks too; the tokens are the torch path's without drafts."""
    path = str(tiny_model("llama"))
    reference = LLM(path, kernel_backend="torch", **KNOBS)
    triton = LLM(path, kernel_backend="triton", speculative_config={
        "method": "draft", "model": path, "num_speculative_tokens": 3, "disable_by_batch_size": 4}, **KNOBS)
    draft = triton.engine.scheduler.proposer.runner
    for runner in (triton.engine.runner, draft):
        runner.enable_decode_graphs(EagerReplay)
    assert draft.attention_backend.name == "triton"
    replays = []
    original = draft.decode_graphs.run
    draft.decode_graphs.run = lambda *args: replays.append(original(*args)) or replays[-1]
    assert _tokens(triton) == _tokens(reference)
    assert triton.engine.get_stats()["spec_decode_num_accepted_tokens"] > 0
    assert any(hidden is not None for hidden in replays)  # the draft's decode steps replayed


def test_graphs_refuse_the_torch_backend(tiny_model):
    llm = LLM(str(tiny_model("llama")), kernel_backend="torch", **KNOBS)
    with pytest.raises(ValueError, match="not graph-safe"):
        llm.engine.runner.enable_decode_graphs(EagerReplay)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]


def test_kernel_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_kernel_backend("auto", cpu) == "torch"  # the interpreter is for tests, never chosen by auto
    assert resolve_kernel_backend("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_kernel_backend("triton", cpu)
    with pytest.raises(ValueError, match="kernel_backend must be"):
        resolve_kernel_backend("cuda", cpu)
