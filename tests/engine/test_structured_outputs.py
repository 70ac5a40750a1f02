"""Structured outputs (llguidance grammars applied as a vocabulary mask inside the sampler): every output of the
bundled model, sampled with seeds, is in the language asked for — a JSON Schema (checked with jsonschema), any
JSON object, a regex, a choice, a Lark grammar —, ends with "stop" when the language does, and constrained
requests share a batch with unconstrained ones without changing them."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
import torch

from microscale import LLM, SamplingParams
from microscale.engine import structured
from microscale.engine.sampler import SamplingBatch, SamplingRow
from microscale.engine.structured import StepMasks, unpack_bitmask
from microscale.sampling_params import SamplingParamError, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPT = "def parse(line):"


@pytest.fixture(scope="module")
def llm(pytestconfig):
    return LLM(str(pytestconfig.rootpath / "models" / "tiny-llama-pycode"), dtype="float32", max_model_len=512)


def texts(llm: LLM, params: list[SamplingParams]) -> list[tuple[str, str]]:
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def sampled(constraint: StructuredOutputsParams, count: int, max_tokens: int = 96, n: int = 1):
    return [SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=max_tokens, structured_outputs=constraint)
            for seed in range(count)]


def test_json_schema_outputs_validate(llm):
    for text, finish in texts(llm, sampled(StructuredOutputsParams(json=SCHEMA), 12)):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop"


def test_json_object_and_schema_as_text(llm):
    """Any JSON object has no length bound: an output cut by max_tokens is a prefix; those that end parse."""
    anything = texts(llm, sampled(StructuredOutputsParams(json_object=True), 4, n=2, max_tokens=64))
    assert all(text.startswith("{") for text, _ in anything)
    ended = [text for text, finish in anything if finish == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    for text, finish in texts(llm, sampled(StructuredOutputsParams(json=json.dumps(SCHEMA)), 2)):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop"


def test_regex_choice_and_grammar(llm):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for text, _ in texts(llm, sampled(StructuredOutputsParams(regex=pattern), 6)):
        assert re.fullmatch(pattern, text), text
    choices = ["yes", "no", "maybe later"]
    for text, finish in texts(llm, sampled(StructuredOutputsParams(choice=choices), 6)):
        assert text in choices and finish == "stop"
    grammar = 'start: "call(" ARGS ")"\nARGS: /[0-9]{1,3}(,[0-9]{1,3}){0,3}/'
    for text, _ in texts(llm, sampled(StructuredOutputsParams(grammar=grammar), 4)):
        assert re.fullmatch(r"call\([0-9]{1,3}(,[0-9]{1,3}){0,3}\)", text), text


def test_constrained_and_free_requests_share_a_batch(llm):
    free = SamplingParams(temperature=0, max_tokens=16)
    alone = texts(llm, [free])
    together = texts(llm, [*sampled(StructuredOutputsParams(json=SCHEMA), 3), free])
    assert together[-1] == alone[0]
    assert not alone[0][0].startswith("{")  # the free request was not constrained


def test_mask_allows_exactly_the_grammar_s_next_tokens(llm):
    engine = llm.engine
    vocab_size = engine.model_config.vocab_size
    matchers = engine.grammars.matchers(StructuredOutputsParams(choice=["yes", "no"]))
    mask = unpack_bitmask(StepMasks(matchers, vocab_size).bitmask(), vocab_size, engine.device)[0]
    allowed = {engine.tokenizer.decode([t]) for t in mask.nonzero().flatten().tolist()}
    assert allowed and all("yes".startswith(text) or "no".startswith(text) for text in allowed), allowed


def test_host_and_device_unpacking_agree():
    """The CPU's numpy unpacking and the accelerators' torch one give every token the same bit."""
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    host = structured._unpack_on_host(bitmask, 100)
    assert host.dtype == torch.bool and host.shape == (5, 100)
    assert torch.equal(host, structured._unpack_on_device(bitmask, 100, torch.device("cpu")))
    assert host[0].tolist() == [bool(int(bitmask[0, t // 32]) >> (t % 32) & 1) for t in range(100)]


def test_min_tokens_does_not_block_a_grammar_s_end(llm):
    """At its end a grammar allows only EOS: min_tokens must not block it there (nothing would be left)."""
    engine = llm.engine
    params = SamplingParams(min_tokens=5, max_tokens=8)
    free = SamplingRow(params, [1, 2], 2)
    masks = StepMasks(engine.grammars.matchers(StructuredOutputsParams(choice=["a"])), engine.model_config.vocab_size)
    constrained = SamplingRow(params, [1, 2], 2, allowed=masks.row(0))
    batch = SamplingBatch.build([free, constrained], engine.eos_token_ids, engine.model_config.vocab_size,
                                engine.device)
    assert set(batch.blocked[0]) == {0}  # only the free row's EOS is blocked


@pytest.mark.parametrize(
    "constraint, match",
    [
        (dict(regex="[0-9"), "structured_outputs"),
        (dict(json="{not json"), "structured_outputs"),
        (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "structured_outputs"),
        (dict(grammar="start: missing_rule"), "structured_outputs"),
    ],
    ids=["bad-regex", "schema-not-json", "bad-schema-type", "bad-grammar"],
)
def test_invalid_grammar_is_the_request_s_error(llm, constraint, match):
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**constraint))
    with pytest.raises(SamplingParamError, match=match):
        llm.generate(PROMPT, params, use_tqdm=False)
    assert texts(llm, [SamplingParams(temperature=0, max_tokens=2)])  # the engine goes on


@pytest.mark.parametrize("kwargs", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []}, {"choice": [""]}])
def test_params_take_exactly_one_language(kwargs):
    with pytest.raises(SamplingParamError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)


def test_a_model_whose_eos_ids_the_tokenizer_lacks(tiny_model, tmp_path):
    """Dummy weights of a real shape run with a small tokenizer (benchmarks): the engine starts and serves plain
    requests; a structured one is refused with the reason (its grammar could never end)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model("llama", vocab_size=5000), model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 4500}))
    llm = LLM(str(model), dtype="float32", max_model_len=64)
    assert len(llm.generate([PROMPT], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    constrained = SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json_object=True))
    with pytest.raises(ValueError, match=r"EOS ids \[4500\] are past its 4096 tokens"):
        llm.generate([PROMPT], constrained, use_tqdm=False)
