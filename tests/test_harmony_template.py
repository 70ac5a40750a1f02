"""gpt-oss's harmony chat template rendered by microscale and by transformers, on the bundled tokenizer.

tests/data/gpt_oss_chat_template.jinja is the chat_template.jinja of the Hugging Face repos openai/gpt-oss-20b and
openai/gpt-oss-120b, byte for byte llama.cpp's copy models/templates/openai-gpt-oss-120b.jinja (sha256
a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146). It exercises much of jinja: macros,
namespace(), slicing loop_messages[loop.index:], `is mapping`/`is iterable` tests, tojson, raise_exception and
strftime_now (the current date, pinned here in both renderers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
import transformers.utils.chat_template_utils as hf_chat  # noqa: E402

from microscale.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "models" / "tiny-llama-pycode"
TEMPLATE = (Path(__file__).parent / "data" / "gpt_oss_chat_template.jinja").read_text()


pytestmark = pytest.mark.usefixtures("pinned_chat_date")


@pytest.fixture(scope="module", params=["tokenizer_config", "chat_template.jinja"])
def folder(request, tmp_path_factory) -> Path:
    """The bundled tokenizer with the harmony template, embedded in tokenizer_config.json or (as in the gpt-oss
    repos) in its own chat_template.jinja."""
    path = tmp_path_factory.mktemp("harmony")
    shutil.copy(BUNDLED_MODEL / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((BUNDLED_MODEL / "tokenizer_config.json").read_text())
    del config["chat_template"]
    if request.param == "tokenizer_config":
        config["chat_template"] = TEMPLATE
    else:
        (path / "chat_template.jinja").write_text(TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def both(folder):
    return Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "default": 1},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "where": {"type": ["string", "null"]},
                "extra": {"type": "object", "properties": {"lang": {"type": "string"}, "n": {"type": "number"}}},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "user_only": [{"role": "user", "content": "Hello, ünïcödé 🐍"}],
    "multi_turn": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a list."},
        {"role": "assistant", "content": "xs[::-1]"},
        {"role": "user", "content": "In place?"},
        {"role": "assistant", "content": "xs.reverse()"},
        {"role": "user", "content": "Thanks."},
    ],
    "thinking": [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "thinking": "91 = 7 * 13.", "content": "No: 91 = 7 × 13."},
    ],
    "thinking_earlier_turn": [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "thinking": "91 = 7 * 13.", "content": "No."},
        {"role": "user", "content": "And 97?"},
    ],
    "developer": [
        {"role": "developer", "content": "Always answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
    ],
    "tool_call": [
        {"role": "developer", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "thinking": "Need the weather tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
        },
        {"role": "tool", "content": {"temperature": 21, "sky": "clear"}},
    ],
    "tool_call_then_final": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Calling the tool.",
            "tool_calls": [
                {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
            ],
        },
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains in Oslo."},
    ],
}

KWARGS = [
    {},
    {"reasoning_effort": "high"},
    {"reasoning_effort": "low", "model_identity": "You are a test model.", "builtin_tools": ["browser", "python"]},
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=["default", "high", "identity_builtin_tools"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_harmony_matches_transformers(both, name, kwargs, add_generation_prompt) -> None:
    ours, hf = both
    messages = CONVERSATIONS[name]
    if name.startswith("tool_call"):
        kwargs = {**kwargs, "tools": [WEATHER_TOOL]}
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert got == expected
    assert "Current date: 2025-08-05\n" in got
    assert f"Reasoning: {kwargs.get('reasoning_effort', 'medium')}\n" in got
    assert got.endswith("<|start|>assistant") == add_generation_prompt


def test_harmony_reasoning_content_alias(both) -> None:
    """transformers fills `thinking` (what this template reads) from `reasoning_content`, as OpenAI-style clients
    send it; so does microscale."""
    if not hasattr(hf_chat, "_alias_reasoning_fields"):
        pytest.skip("this transformers does not alias reasoning fields")
    ours, hf = both
    messages = [
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "reasoning_content": "91 = 7 * 13.", "content": "No."},
    ]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert "<|channel|>analysis<|message|>91 = 7 * 13.<|end|>" in expected
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert "thinking" not in messages[1]  # the caller's message is left as it was


def test_harmony_raise_exception(both) -> None:
    ours, hf = both
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<|channel|>analysis<|message|>hmm<|end|>"},
    ]
    with pytest.raises(Exception, match="channel"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match="You have passed a message containing <|channel|> tags"):
        ours.apply_chat_template(messages)


def test_harmony_layout(both) -> None:
    ours, _ = both
    text = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>hi<|end|><|start|>assistant"
    )


# What transformers' chat template environment offers beyond plain jinja (utils/chat_template_utils.py).
ENVIRONMENT_TEMPLATES = {
    "break": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}|{% endfor %}",
    "continue": "{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}",
    "tojson_indent_sort": "{{ messages | tojson(indent=2, sort_keys=True) }}",
    "tojson_separators_ascii": "{{ messages | tojson(separators=(',', ':'), ensure_ascii=True) }}",
    "tools_documents_none": "{{ tools is none }} {{ documents is none }} {{ tools is defined }}",
    "generation_tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{% set x = m.content %}{{ x }}"
        "{% endgeneration %}{% else %}{{ m.role }}{% endif %}{% endfor %}{{ x is defined }}"
    ),
    "special_tokens": "{{ bos_token }}{{ eos_token }}{{ pad_token }}",
    "reasoning": "{% for m in messages %}{{ m.thinking }}/{{ m.reasoning_content }};{% endfor %}",
}
ENVIRONMENT_MESSAGES = [
    {"role": "system", "content": "Be brief <b>&</b>."},
    {"role": "user", "content": 'ünïcödé "quotes"'},
    {"role": "assistant", "content": "ok", "reasoning": "thought"},
]


@pytest.mark.parametrize("name", list(ENVIRONMENT_TEMPLATES))
def test_template_environment_matches_transformers(both, folder, name) -> None:
    template = ENVIRONMENT_TEMPLATES[name]
    if name == "reasoning" and not hasattr(hf_chat, "_alias_reasoning_fields"):
        pytest.skip("this transformers does not alias reasoning fields")
    ours = Tokenizer.from_pretrained(folder)
    ours.chat_template = template
    expected = both[1].apply_chat_template(ENVIRONMENT_MESSAGES, tokenize=False, chat_template=template)
    assert ours.apply_chat_template(ENVIRONMENT_MESSAGES) == expected
