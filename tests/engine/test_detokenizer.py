"""IncrementalDetokenizer with the bundled byte-level BPE tokenizer, whose tokens split multi-byte UTF-8
characters: no U+FFFD in the final text, the same text as a full decode, stop strings caught even when
split across tokens, and streaming that never leaks (part of) a stop string."""

from __future__ import annotations

from pathlib import Path

import pytest

from microscale.engine.detokenizer import IncrementalDetokenizer
from microscale.tokenizer import Tokenizer

BUNDLED_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-llama-pycode"

TEXTS = [
    "héllo 世界 🎉",
    'x = "naïve café — 世界"\n',
    "🎉🎉 ok 😀\n    return 'ß∂ƒ'\n",
    "def f():\n    return 1\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(BUNDLED_MODEL)


def feed(det: IncrementalDetokenizer, ids: list[int], check_stop=True) -> tuple[str | None, int]:
    """Add tokens until a stop string is found; returns it and how many tokens were added."""
    for i, t in enumerate(ids, 1):
        stop = det.add_token(t, check_stop=check_stop)
        if stop is not None:
            return stop, i
    return None, len(ids)


def test_tokens_really_split_characters(tok):
    ids = tok.encode("héllo 世界 🎉")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # otherwise the tests below prove nothing
    assert tok.decode(ids) == "héllo 世界 🎉"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "import os\n", "s = '日本"])
def test_incremental_equals_full_decode(tok, text, prompt):
    prompt_ids = tok.encode(prompt) or [0]
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, prompt_ids)
    pieces = []
    for t in ids:
        assert det.add_token(t) is None
        assert "\ufffd" not in det.output_text
        pieces.append(det.new_text(finished=False))
    pieces.append(det.new_text(finished=True))
    assert det.output_text == tok.decode(ids) == text
    assert "".join(pieces) == text


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("a") + [2] + tok.encode("é")
    det = IncrementalDetokenizer(tok, [0], skip_special_tokens=True)
    feed(det, ids)
    assert det.output_text == "aé"
    det = IncrementalDetokenizer(tok, [0], skip_special_tokens=False)
    feed(det, ids)
    assert det.output_text == "a<|im_end|>é"


@pytest.mark.parametrize(
    ("text", "stop", "before"),
    [
        ("héllo 世界 🎉 and more", "世界", "héllo "),  # every byte of the stop string in its own token
        ("héllo 世界 🎉 and more", "lo 世", "hél"),  # ASCII and half characters in one stop string
        ("héllo 世界 🎉 and more", "🎉", "héllo 世界 "),
        ("def f():\n    return 1\n\ndef g():\n", "\n\n", "def f():\n    return 1"),
        ("def f():\n    return 1\n", "turn", "def f():\n    re"),  # inside one token ('return')
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(tok, text, stop, before, include):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [0], stop_strings=["never", stop], include_stop_str_in_output=include)
    streamed: list[str] = []
    found, n = None, 0
    while found is None and n < len(ids):
        found = det.add_token(ids[n])
        n += 1
        streamed.append(det.new_text(finished=found is not None))
    assert found == stop
    expected = before + stop if include else before
    assert det.output_text == expected
    assert "".join(streamed) == expected  # streaming never showed more, e.g. part of the stop string
    assert det.visible_text(finished=True) == expected
    # It stopped at the token that completed the stop string.
    assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[: n - 1])


def test_streaming_holds_back_a_possible_stop_prefix(tok):
    det = IncrementalDetokenizer(tok, [0], stop_strings=["abcd"])
    for t in tok.encode("xx ab"):
        assert det.add_token(t) is None
    shown = det.new_text(finished=False)
    assert "ab" not in shown and det.output_text == "xx ab"  # "ab" could start "abcd"
    assert det.visible_text(finished=False) == "xx"  # the same hold-back for whole (non-delta) outputs
    assert det.visible_text(finished=True) == "xx ab"
    for t in tok.encode("x"):
        det.add_token(t)
    assert shown + det.new_text(finished=False) + det.new_text(finished=True) == "xx abx"


def test_stop_string_not_checked_before_min_tokens(tok):
    """With check_stop off (min_tokens not reached) a stop string is not acted on; later only new text (and
    the stop string's length before it) is searched, as in vLLM."""
    det = IncrementalDetokenizer(tok, [0], stop_strings=["STOP"])
    found, _ = feed(det, tok.encode("a STOP b"), check_stop=False)
    assert found is None and det.output_text == "a STOP b"
    found, _ = feed(det, tok.encode(" c d"))
    assert found is None
    # A stop string straddling the text from before and after the switch is found.
    det = IncrementalDetokenizer(tok, [0], stop_strings=["STOP"])
    feed(det, tok.encode("a ST"), check_stop=False)
    found, _ = feed(det, tok.encode("OP b"))
    assert found == "STOP" and det.output_text == "a "
