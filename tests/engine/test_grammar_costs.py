"""What structured outputs cost the engine, and how it bounds it: a schema sent again is not compiled again, a
grammar past structured_outputs_max_compile_ms (its lexer work, or its wall time) is a clean error and never a
stalled engine, and the step's masks are filled while the forward runs without changing any output."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from microscale import LLM, SamplingParams
from microscale.engine import structured
from microscale.sampling_params import SamplingParamError, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}
PROMPT = "def parse(line):"
# 3000 alternatives: the lexer needs ~34k units of fuel to build, above what 0.1 ms allows (5k).
COSTLY = StructuredOutputsParams(json={"enum": [f"value-{i}" for i in range(3000)]})
WAIT_S = 300  # only turns a hang into a failure: nothing below races a clock


@pytest.fixture(scope="module")
def llm(pytestconfig):
    return LLM(str(pytestconfig.rootpath / "models" / "tiny-llama-pycode"), dtype="float32", max_model_len=256)


def greedy(constraint: StructuredOutputsParams | None, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=constraint)


def test_a_schema_sent_again_is_not_compiled_again(llm):
    compiled = llm.engine.grammars.compiled
    schema = {**SCHEMA, "title": "cache probe"}  # a text no other test compiles
    before = compiled.cache_info()
    first = llm.generate(PROMPT, greedy(StructuredOutputsParams(json=schema)), use_tqdm=False)
    after_first = compiled.cache_info()
    second = llm.generate([PROMPT] * 2, greedy(StructuredOutputsParams(json=schema)), use_tqdm=False)
    after_second = compiled.cache_info()
    assert after_first.misses == before.misses + 1
    assert after_second.misses == after_first.misses and after_second.hits == after_first.hits + 2
    assert [o.outputs[0].text for o in second] == [first[0].outputs[0].text] * 2  # a fresh matcher each


def test_a_grammar_past_the_lexer_budget_is_a_clean_error(llm, monkeypatch):
    """The lexer's fuel alone stops it (the wall clock, which might trip first at 0.1 ms, is taken out)."""
    monkeypatch.setattr(structured, "_within", lambda limit_ms, compile_grammar: compile_grammar())
    monkeypatch.setattr(llm.engine.grammars, "max_compile_ms", 0.1)
    with pytest.raises(SamplingParamError, match="too big.*structured_outputs_max_compile_ms=0.1") as caught:
        llm.generate([PROMPT, PROMPT], [greedy(None), greedy(COSTLY)], use_tqdm=False)
    assert caught.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()  # the call's other request did not stay queued
    with pytest.raises(SamplingParamError, match="too big"):
        structured.check_grammar(COSTLY, 0.1)  # the server's front check, no tokenizer
    structured.check_grammar(COSTLY, 1000)


def test_a_compilation_past_the_time_limit_is_a_clean_error(llm, monkeypatch):
    """The compilation is held (deterministically: until the error is raised) past a 50 ms limit."""
    release = threading.Event()
    real_limits = structured._parser_limits

    def held_limits(max_compile_ms: float):  # evaluated on the compile thread, before llguidance compiles
        assert release.wait(WAIT_S)
        return real_limits(max_compile_ms)

    monkeypatch.setattr(structured, "_parser_limits", held_limits)
    monkeypatch.setattr(llm.engine.grammars, "max_compile_ms", 50)
    schema = {**SCHEMA, "title": "held"}
    try:
        with pytest.raises(SamplingParamError, match="did not compile within 50 ms"):
            llm.generate(PROMPT, greedy(StructuredOutputsParams(json=schema)), use_tqdm=False)
    finally:
        release.set()
    assert llm.generate(PROMPT, greedy(None, 2), use_tqdm=False)[0].outputs[0].token_ids  # the engine goes on


def test_masks_are_filled_while_the_forward_runs(llm, monkeypatch):
    """The fill waits for the forward to start and the forward for the fill to start: a step that computed its
    masks after (or before) the forward would hang here instead of finishing. Outputs are those of a normal run."""
    params = [greedy(StructuredOutputsParams(json=SCHEMA)), greedy(None),
              greedy(StructuredOutputsParams(regex="[a-z]{3}-[0-9]{2}"))]
    expected = [o.outputs[0].text for o in llm.generate([PROMPT] * 3, params, use_tqdm=False)]
    fill_started, forward_started = threading.Event(), threading.Event()
    steps = {"overlapped": 0}
    real_fill, real_execute = structured.fill_bitmask, llm.engine.executor.execute

    def fill(matchers, bitmask):
        fill_started.set()
        assert forward_started.wait(WAIT_S)
        forward_started.clear()  # for the next step (whose forward starts only after this fill was joined)
        real_fill(matchers, bitmask)

    def execute(chunks, swaps=None):
        if any(c.seq.matcher is not None and c.samples for c in chunks):
            forward_started.set()
            assert fill_started.wait(WAIT_S)
            fill_started.clear()
            steps["overlapped"] += 1
        return real_execute(chunks, swaps)

    monkeypatch.setattr(structured, "fill_bitmask", fill)
    monkeypatch.setattr(llm.engine.executor, "execute", execute)
    outputs = [o.outputs[0].text for o in llm.generate([PROMPT] * 3, params, use_tqdm=False)]
    assert outputs == expected
    assert steps["overlapped"] >= 5
    jsonschema.validate(json.loads(outputs[0]), SCHEMA)


@pytest.mark.parametrize("bad", [{}, {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema",
                                                                                  "json_schema": {"name": "x"}}, [1]])
def test_response_format_shapes(bad):
    with pytest.raises(SamplingParamError, match="response_format"):
        StructuredOutputsParams.from_response_format(bad)


def test_chat_response_format(llm):
    messages = [{"role": "user", "content": "Describe a point."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    sampled = [SamplingParams(temperature=1.0, seed=seed, max_tokens=48) for seed in range(3)]
    for out in llm.chat([messages] * 3, sampled, use_tqdm=False, response_format=response_format):
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert all(p.structured_outputs is None for p in sampled)  # the caller's params are left as they were
    (anything,) = llm.chat(messages, use_tqdm=False, response_format={"type": "json_object"})
    assert anything.outputs[0].text.startswith("{")
    free = SamplingParams(temperature=0, max_tokens=8)
    assert (llm.chat(messages, free, use_tqdm=False, response_format={"type": "text"})[0].outputs[0].text
            == llm.chat(messages, free, use_tqdm=False)[0].outputs[0].text)
    with pytest.raises(SamplingParamError, match="not both"):
        llm.chat(messages, greedy(StructuredOutputsParams(json_object=True)), use_tqdm=False,
                 response_format=response_format)
