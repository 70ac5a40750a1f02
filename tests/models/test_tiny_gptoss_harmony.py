"""The bundled models/tiny-gptoss-harmony (made by tools/train_harmony_model.py): harmony's markers are single
special tokens, gpt-oss's template renders the tools, and microscale and transformers write the same greedy reply
to a tool request, a well-formed harmony call."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO
from hf_reference import hf_greedy, hf_model, ms_greedy

from microscale import LLM, SamplingParams
from microscale.serve.tool_parsers import tool_family
from microscale.serve.tool_parsers.harmony import HarmonyParser
from microscale.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

MODEL = REPO / "models" / "tiny-gptoss-harmony"
BASE = REPO / "models" / "tiny-gptoss-pycode"
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "required": ["a", "b"], "properties": {"a": {"type": "number"},
                                                                           "b": {"type": "number"}}}}}
TOOL_REQUEST = [{"role": "user", "content": "What's the weather in Lisbon?"}]
CALL = re.compile(r"^<\|channel\|>analysis<\|message\|>[^<]*<\|end\|><\|start\|>assistant<\|channel\|>commentary "
                  r"to=functions\.(\w+) <\|constrain\|>json<\|message\|>(.*?)<\|call\|>")


pytestmark = pytest.mark.usefixtures("pinned_chat_date")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(MODEL), dtype="float32", max_model_len=512, max_num_seqs=2)


def test_harmony_tokens_are_single_special_tokens(tokenizer) -> None:
    base = Tokenizer.from_pretrained(BASE)
    assert [tokenizer.token_to_id(t) for t in HARMONY_TOKENS] == list(range(4096, 4103))
    text = "<|start|>assistant<|channel|>final<|message|>def f(x):\n    return x<|return|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [i for i in ids if i >= 4096] == [4096, 4099, 4098, 4101]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == "assistantfinaldef f(x):\n    return x"
    # The base vocabulary keeps its ids.
    assert tokenizer.encode("import os\n") == base.encode("import os\n")
    config = json.loads((MODEL / "config.json").read_text())
    generation = json.loads((MODEL / "generation_config.json").read_text())
    assert config["vocab_size"] == tokenizer.vocab_size == 4103
    assert generation["eos_token_id"] == [4101, 0, 4102]
    assert tool_family(tokenizer, None) is HarmonyParser  # its template writes harmony


def test_template_renders_tools_as_transformers_does(tokenizer) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(MODEL)
    ours = tokenizer.apply_chat_template(TOOL_REQUEST, tools=[WEATHER, ADD])
    assert ours == hf.apply_chat_template(TOOL_REQUEST, tools=[WEATHER, ADD], tokenize=False,
                                          add_generation_prompt=True)
    assert "namespace functions {\n\n// Get the current weather in a city.\ntype get_weather = (_: {\n" in ours
    assert ours.endswith("<|start|>user<|message|>What's the weather in Lisbon?<|end|><|start|>assistant")


def test_tool_call_greedy_matches_transformers(tokenizer, llm) -> None:
    """float32 on both sides: the same greedy tokens, and they are a harmony call with JSON arguments."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(TOOL_REQUEST, tools=[ADD, WEATHER]),
                              add_special_tokens=False)
    [ours] = ms_greedy(llm, [prompt], 80)
    assert ours == hf_greedy(hf_model(MODEL), prompt, 80)
    call = CALL.match(tokenizer.decode(ours, skip_special_tokens=False))
    assert call is not None and call.group(1) == "get_weather"
    assert isinstance(json.loads(call.group(2)), dict)


def test_plain_reply_splits_into_reasoning_and_content(tokenizer, llm) -> None:
    """Greedy with the model's own stop tokens: analysis, then a final answer ending in <|return|>, which the
    harmony parser turns into reasoning and content."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)[0].outputs[0]
    text = tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert re.fullmatch(r"<\|channel\|>analysis<\|message\|>[^<]+<\|end\|><\|start\|>assistant"
                        r"<\|channel\|>final<\|message\|>[^<]+<\|return\|>", text), text
    split = HarmonyParser(tokenizer).parse(out.text, out.token_ids, finished=True)
    assert split.reasoning == text.split("<|message|>")[1].split("<|end|>")[0]
    assert split.content == text.split("<|message|>")[2].removesuffix("<|return|>")
