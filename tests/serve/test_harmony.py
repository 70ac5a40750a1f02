"""gpt-oss harmony replies split into reasoning_content (analysis channel) and content (final channel),
whole and streamed token by token, on a tokenizer that has the harmony marker tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from microscale.serve.harmony import HarmonyStream, split_harmony, uses_harmony
from microscale.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
MARKERS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
REPLY = ("<|channel|>analysis<|message|>The user wants a sum: 2 + 2 = 4, naïvely.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>It is 4 — ünïcödé too.<|return|>")


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("harmony-tokenizer")
    hf = HFTokenizer.from_file(str(REPO / "models" / "tiny-llama-pycode" / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(m, special=True) for m in MARKERS])
    hf.save(str(folder / "tokenizer.json"))
    template = (REPO / "tests" / "data" / "gpt_oss_chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return Tokenizer.from_pretrained(folder)


def test_detects_harmony_models(harmony_tokenizer) -> None:
    assert uses_harmony(harmony_tokenizer)
    assert not uses_harmony(Tokenizer.from_pretrained(REPO / "models" / "tiny-llama-pycode"))


def test_whole_reply_splits_into_channels(harmony_tokenizer) -> None:
    ids = harmony_tokenizer.encode(REPLY, add_special_tokens=False)
    split = split_harmony(harmony_tokenizer, ids)
    assert split.reasoning == "The user wants a sum: 2 + 2 = 4, naïvely."
    assert split.content == "It is 4 — ünïcödé too."
    plain = harmony_tokenizer.encode("no channels here", add_special_tokens=False)
    assert split_harmony(harmony_tokenizer, plain).content == "no channels here"


def test_streamed_deltas_add_up_to_the_whole(harmony_tokenizer) -> None:
    ids = harmony_tokenizer.encode(REPLY, add_special_tokens=False)
    stream = HarmonyStream(harmony_tokenizer)
    reasoning = content = ""
    for n in range(1, len(ids) + 1):
        delta = stream.delta(0, ids[:n], finished=n == len(ids))
        assert "\ufffd" not in delta.reasoning + delta.content  # half characters wait for their next byte
        reasoning += delta.reasoning
        content += delta.content
    whole = split_harmony(harmony_tokenizer, ids)
    assert (reasoning, content) == (whole.reasoning, whole.content)
