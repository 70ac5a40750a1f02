"""gpt-oss's harmony output format, split for the chat API: the `analysis` channel becomes
`reasoning_content`, the `final` channel `content`.

A reply looks like `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...
<|return|>`. The markers are special tokens, which the detokenizer drops from `text`, so the split reads the
token ids (decoded with special tokens kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from microscale.tokenizer import Tokenizer

_CHANNEL = "<|channel|>"
# channel name (optionally with a recipient, "commentary to=functions.x"), then the message up to its end.
_MESSAGE = re.compile(r"<\|channel\|>(\w+)[^<]*<\|message\|>(.*?)(?=<\|end\|>|<\|return\|>|<\|call\|>|<\|start\|>|$)",
                      re.DOTALL)


def uses_harmony(tokenizer: Tokenizer) -> bool:
    """The model's chat template writes harmony channels, and its vocabulary has the marker tokens."""
    template = tokenizer.chat_template or ""
    return _CHANNEL in template and tokenizer.token_to_id(_CHANNEL) is not None


@dataclass
class HarmonySplit:
    reasoning: str
    content: str


def split_harmony(tokenizer: Tokenizer, token_ids: list[int]) -> HarmonySplit:
    """Reasoning (analysis channel) and content (final channel; any text outside channels too)."""
    text = tokenizer.decode(token_ids, skip_special_tokens=False)
    if _CHANNEL not in text:
        return HarmonySplit("", tokenizer.decode(token_ids))
    reasoning, content = [], []
    for channel, message in _MESSAGE.findall(text):
        (reasoning if channel == "analysis" else content).append(message)
    return HarmonySplit("".join(reasoning), "".join(content))


class HarmonyStream:
    """Per choice, what reasoning and content gained since the last call (for streamed chunks). A trailing
    incomplete UTF-8 character (decoded as U+FFFD) waits for its next token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._sent: dict[int, tuple[int, int]] = {}

    def delta(self, index: int, token_ids: list[int], finished: bool) -> HarmonySplit:
        split = split_harmony(self.tokenizer, token_ids)
        if not finished:
            split = HarmonySplit(split.reasoning.rstrip("\ufffd"), split.content.rstrip("\ufffd"))
        sent_reasoning, sent_content = self._sent.get(index, (0, 0))
        self._sent[index] = (max(sent_reasoning, len(split.reasoning)), max(sent_content, len(split.content)))
        return HarmonySplit(split.reasoning[sent_reasoning:], split.content[sent_content:])
