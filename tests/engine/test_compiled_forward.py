"""The compiled forward on CPU (torch.compile): greedy outputs equal the eager forward's in float32, with prompt
chunks and decode batches of several sizes through the one graph, and with a draft model's runner compiled in the
same process; enforce_eager and the cases it cannot serve keep the eager forward."""

from __future__ import annotations

import pytest
import torch
from hf_reference import ms_greedy, small_llm
from torch._inductor.async_compile import AsyncCompile

from microscale import LLM

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40)]


@pytest.fixture(scope="module")
def compiling():
    """torch.compile switched back on (tests/conftest.py turns it off for everything else)."""
    with torch._dynamo.config.patch(disable=False):
        yield


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def compiled(compiling, model) -> LLM:
    return small_llm(model)


def test_greedy_outputs_equal_the_eager_forward(compiled, model, assert_idle) -> None:
    assert compiled.engine.runner.compiled_forward is not None and compiled.engine.compile_seconds > 0
    assert AsyncCompile.process_pool.cache_info().currsize == 0  # compiled in-process: no worker pool to hang on
    eager = small_llm(model, enforce_eager=True)
    assert eager.engine.runner.compiled_forward is None
    # Three prompts at once (prefill chunks, then decode batches of 3, 2 and 1 as they finish), then one alone.
    outputs = ms_greedy(compiled, PROMPTS, 12)
    assert outputs == ms_greedy(eager, PROMPTS, 12)
    assert ms_greedy(compiled, PROMPTS[:1], 12) == outputs[:1]
    assert_idle(compiled)


def test_a_compiled_draft_model_beside_the_compiled_target(compiling, model, compiled) -> None:
    # The model as its own draft: two compiled runners in one process, each attention op reading its own
    # runner's layers and step (a draft that agrees with the target has every proposal accepted).
    spec = {"method": "draft", "model": str(model), "num_speculative_tokens": 3, "disable_by_batch_size": 4}
    llm = small_llm(model, speculative_config=spec)
    assert llm.engine.scheduler.proposer.runner.compiled_forward is not None
    assert ms_greedy(llm, PROMPTS, 12) == ms_greedy(compiled, PROMPTS, 12)
    stats = llm.engine.get_stats()
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0


def test_eager_where_compiling_does_not_apply(compiling, model) -> None:
    runner = small_llm(model, deterministic=True).engine.runner
    assert runner.compiled_forward is None
    assert runner.compile_unavailable_reason() == "batch-invariant mode pads every matmul's rows, eagerly"
    runner = small_llm(model, quantization="fp8-dynamic").engine.runner
    assert runner.compiled_forward is None
    assert runner.compile_unavailable_reason().startswith("quantized weights (Fp8DynamicMethod)")
