"""Tool-call parsers per family (harmony, Hermes, Llama 3 JSON): replies into content, reasoning and calls; the
streamed deltas, with the reply cut at every token boundary, add up to the non-streamed message; the grammars of
tool_choice "required" accept exactly valid calls."""

from __future__ import annotations

import json

import llguidance
import pytest
from conftest import BUNDLED_MODEL
from tool_models import HARMONY_MARKERS, VOCAB_SIZE, tokenizer_folder

from microscale.serve.chat_replies import ReplyDeltas, assistant_message
from microscale.serve.tool_parsers import FunctionTool, ToolCall, reply_parser, tool_family
from microscale.serve.tool_parsers.harmony import HarmonyParser
from microscale.serve.tool_parsers.hermes import HermesParser
from microscale.serve.tool_parsers.llama_json import Llama3JsonParser
from microscale.tokenizer import Tokenizer

WEATHER = FunctionTool("get_weather", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False,
})
ADD = FunctionTool("add", {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                           "required": ["a", "b"], "additionalProperties": False})


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory) -> Tokenizer:
    """The bundled tokenizer with harmony's markers and gpt-oss's chat template."""
    return Tokenizer.from_pretrained(tokenizer_folder(tmp_path_factory.mktemp("harmony"), HARMONY_MARKERS, True,
                                                      "gpt_oss_chat_template.jinja", ["<|return|>", "<|call|>"]))


@pytest.fixture(scope="module")
def hermes_tokenizer(tmp_path_factory) -> Tokenizer:
    """The bundled tokenizer with <tool_call> markers and Qwen 2.5's chat template."""
    folder = tokenizer_folder(tmp_path_factory.mktemp("hermes"), ["<tool_call>", "</tool_call>"], False,
                              "qwen2_5_chat_template.jinja", ["<|im_end|>"])
    return Tokenizer.from_pretrained(folder)


HARMONY_REPLIES = {
    "final": ("<|channel|>analysis<|message|>The user wants a sum: 2 + 2 = 4, naïvely.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>It is 4 — ünïcödé too.<|return|>"),
    "call": ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary '
             'to=functions.get_weather <|constrain|>json<|message|>{"city": "Zürich"}<|call|>'),
    # The template's order: recipient before the channel, content type without <|constrain|>.
    "template-order": ('<|channel|>commentary to=functions.add json<|message|>{"a": 1, "b": 2}<|call|>'),
    "preamble-then-call": ("<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant to=functions.add"
                           '<|channel|>commentary json<|message|>{"a": 3, "b": 4}<|call|>'),
    "builtin-tool": ('<|channel|>analysis to=browser.search<|message|>{"query": "x"}<|call|>'),
    "plain": "no channels here at all",
    "cut-off": '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Par',
    # openai-harmony's own parser test vectors (tests/test_harmony.py, v0.0.8), read as its non-strict parser does.
    "harmony-constrain": ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
                          '<|message|>{"location": "Tokyo"}<|call|>'),
    "harmony-constrain-adjacent": ('<|start|>assistant<|channel|>commentary to=functions.get_weather<|constrain|>json'
                                   '<|message|>{"latitude":48.8566,"longitude":2.3522}<|call|>'),
    "harmony-missing-message": ("I must refuse<|end|><|start|>assistant<|channel|>analysis<|message|>We must refuse"
                                "<|end|><|start|>assistant<|channel|>final<|message|>I'm sorry, but I can't help with "
                                "that.<|return|>"),
    "harmony-missing-message-channel": ("<|channel|>analysis I must refuse<|end|><|start|>assistant<|channel|>final"
                                        "<|message|>No.<|return|>"),
    "harmony-missing-message-tool": ("... Let's use the tool.<|end|><|start|>assistant to=functions.get_weather"
                                     '<|channel|>commentary json<|message|>{"location": "Tokyo"}<|call|>'),
}
HARMONY_EXPECTED = {
    "final": ("It is 4 — ünïcödé too.", "The user wants a sum: 2 + 2 = 4, naïvely.", ()),
    "call": ("", "Need the weather.", (ToolCall("get_weather", '{"city": "Zürich"}'),)),
    "template-order": ("", "", (ToolCall("add", '{"a": 1, "b": 2}'),)),
    "preamble-then-call": ("Let me check.", "", (ToolCall("add", '{"a": 3, "b": 4}'),)),
    "builtin-tool": ("", "", ()),
    "plain": ("no channels here at all", "", ()),
    "cut-off": ("", "", (ToolCall("get_weather", '{"city": "Par'),)),
    "harmony-constrain": ("", "", (ToolCall("get_weather", '{"location": "Tokyo"}'),)),
    "harmony-constrain-adjacent": ("", "", (ToolCall("get_weather", '{"latitude":48.8566,"longitude":2.3522}'),)),
    "harmony-missing-message": ("I must refuseI'm sorry, but I can't help with that.", "We must refuse", ()),
    "harmony-missing-message-channel": ("No.", "I must refuse", ()),
    "harmony-missing-message-tool": ("... Let's use the tool.", "",
                                     (ToolCall("get_weather", '{"location": "Tokyo"}'),)),
}

HERMES_REPLIES = {
    "one-call": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
    "text-then-two-calls": ('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n'
                            "</tool_call>"),
    "malformed": "<tool_call>\n{not json}\n</tool_call> then text",
    "unclosed": '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 6}}',
    "plain": "Just prose, with a < sign and <tool_ almost.",
}
HERMES_EXPECTED = {
    "one-call": ("", (ToolCall("get_weather", '{"city": "Zürich"}'),)),
    "text-then-two-calls": ("Let me look.", (ToolCall("add", '{"a": 1, "b": 2}'),
                                             ToolCall("get_weather", '{"city": "Oslo", "unit": "c"}'))),
    "malformed": ("<tool_call>\n{not json}\n</tool_call> then text", ()),
    "unclosed": ("", (ToolCall("add", '{"a": 5, "b": 6}'),)),
    "plain": ("Just prose, with a < sign and <tool_ almost.", ()),
}

LLAMA_REPLIES = {
    "one-call": '{"name": "get_weather", "parameters": {"city": "Zürich"}}',
    "two-calls": '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}',
    "json-answer": '{"answer": 42}',
    "prose": "  The answer is 42.",
    "call-then-junk": '{"name": "add", "parameters": {"a": 1, "b": 2}} and {broken',
}
LLAMA_EXPECTED = {
    "one-call": ("", (ToolCall("get_weather", '{"city": "Zürich"}'),)),
    "two-calls": ("", (ToolCall("add", '{"a": 1, "b": 2}'), ToolCall("add", '{"a": 3, "b": 4}'))),
    "json-answer": ('{"answer": 42}', ()),
    "prose": ("  The answer is 42.", ()),
    "call-then-junk": ("and {broken", (ToolCall("add", '{"a": 1, "b": 2}'),)),
}


def _streamed(parser, tokenizer: Tokenizer, ids: list[int]) -> dict:
    """The message the chunks of a stream add up to, the reply cut at every token boundary (text as the engine's
    detokenizer gives it: special tokens dropped, half characters held back)."""
    deltas = ReplyDeltas(lambda text, token_ids, finished: parser.parse(text, token_ids, finished))
    content, reasoning, calls = "", "", []
    for n in range(1, len(ids) + 1):
        finished = n == len(ids)
        text = tokenizer.decode(ids[:n])
        delta = deltas.delta(0, text if finished else text.rstrip("\ufffd"), ids[:n], finished)
        content += delta.content or ""
        reasoning += delta.reasoning_content or ""
        assert "\ufffd" not in content + reasoning
        for call in delta.tool_calls or []:
            if call.id is not None:
                assert call.index == len(calls) and call.type == "function"
                calls.append([call.function.name, ""])
            calls[call.index][1] += call.function.arguments or ""
    return {"content": content, "reasoning": reasoning, "calls": [tuple(c) for c in calls]}


def _whole(parser, tokenizer: Tokenizer, ids: list[int]) -> dict:
    message = assistant_message(parser.parse(tokenizer.decode(ids), ids, True))
    return {"content": message.content or "", "reasoning": message.reasoning_content or "",
            "calls": [(c.function.name, c.function.arguments) for c in message.tool_calls or []]}


def _check(parser, tokenizer, reply: str, content: str, reasoning: str, calls: tuple) -> None:
    ids = tokenizer.encode(reply, add_special_tokens=False)
    parsed = parser.parse(tokenizer.decode(ids), ids, True)
    assert (parsed.content, parsed.reasoning, parsed.tool_calls) == (content, reasoning, calls)
    assert _streamed(parser, tokenizer, ids) == _whole(parser, tokenizer, ids)


@pytest.mark.parametrize("case", HARMONY_REPLIES)
def test_harmony(harmony_tokenizer, case) -> None:
    content, reasoning, calls = HARMONY_EXPECTED[case]
    _check(HarmonyParser(harmony_tokenizer), harmony_tokenizer, HARMONY_REPLIES[case], content, reasoning, calls)


def test_harmony_without_tools_reports_no_call(harmony_tokenizer) -> None:
    ids = harmony_tokenizer.encode(HARMONY_REPLIES["call"], add_special_tokens=False)
    parsed = HarmonyParser(harmony_tokenizer, with_tool_calls=False).parse("", ids, True)
    assert parsed.tool_calls == () and parsed.reasoning == "Need the weather."


@pytest.mark.parametrize("case", HERMES_REPLIES)
def test_hermes(hermes_tokenizer, case) -> None:
    content, calls = HERMES_EXPECTED[case]
    _check(HermesParser(hermes_tokenizer), hermes_tokenizer, HERMES_REPLIES[case], content, "", calls)


@pytest.mark.parametrize("case", LLAMA_REPLIES)
def test_llama3_json(hermes_tokenizer, case) -> None:
    content, calls = LLAMA_EXPECTED[case]
    _check(Llama3JsonParser(hermes_tokenizer), hermes_tokenizer, LLAMA_REPLIES[case], content, "", calls)


def test_family_from_the_template_or_the_flag(harmony_tokenizer, hermes_tokenizer) -> None:
    assert tool_family(harmony_tokenizer, None) is HarmonyParser
    assert tool_family(hermes_tokenizer, None) is HermesParser
    assert tool_family(Tokenizer.from_pretrained(BUNDLED_MODEL), None) is None  # ChatML without tools
    assert tool_family(hermes_tokenizer, "openai") is HarmonyParser  # vLLM's name for it
    assert tool_family(hermes_tokenizer, "llama3_json") is Llama3JsonParser
    with pytest.raises(ValueError, match="Unknown tool-call parser 'nope'"):
        tool_family(hermes_tokenizer, "nope")
    # Without tools in the request, Hermes markers are just text.
    assert reply_parser(hermes_tokenizer, HermesParser, with_tools=False).parse("<tool_call>", [], True).content


def _accepts(tokenizer: Tokenizer, grammar: str, reply: str) -> bool:
    lltok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=VOCAB_SIZE, eos_token=[0])
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    for token in tokenizer.encode(reply, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return matcher.is_accepting()


@pytest.mark.parametrize(("family", "valid", "invalid"), [
    (HarmonyParser,
     ['<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>',
      '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a":1,"b":2.5}<|call|>'],
     ['<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a":"x","b":2}<|call|>',
      '<|channel|>commentary to=functions.nope <|constrain|>json<|message|>{}<|call|>',
      "<|channel|>final<|message|>prose<|return|>"]),
    (HermesParser,
     ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}\n</tool_call>',
      '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
      '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'],
     ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "k"}}\n</tool_call>',
      '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', "prose"]),
    (Llama3JsonParser,
     ['{"name": "get_weather", "parameters": {"city": "Oslo"}}',
      '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}'],
     ['{"name": "get_weather", "parameters": {}}', '{"name": "sub", "parameters": {"a": 1, "b": 2}}']),
])
def test_required_grammar_accepts_exactly_valid_calls(harmony_tokenizer, hermes_tokenizer, family, valid,
                                                      invalid) -> None:
    tokenizer = harmony_tokenizer if family is HarmonyParser else hermes_tokenizer
    grammar = llguidance.LLMatcher.grammar_from_lark(family.grammar([WEATHER, ADD], parallel=True))
    for reply in valid:
        assert _accepts(tokenizer, grammar, reply), reply
        ids = tokenizer.encode(reply, add_special_tokens=False)
        for call in family(tokenizer).parse(tokenizer.decode(ids), ids, True).tool_calls:
            json.loads(call.arguments)
    for reply in invalid:
        assert not _accepts(tokenizer, grammar, reply), reply
    if family is not HarmonyParser:  # one call only without parallel_tool_calls
        single = llguidance.LLMatcher.grammar_from_lark(family.grammar([WEATHER, ADD], parallel=False))
        assert not _accepts(tokenizer, single, valid[1])
