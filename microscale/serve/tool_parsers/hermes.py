"""Qwen / Hermes tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks in the text,
content around them. `<tool_call>` is an ordinary (non-special) added token, so it is in the text."""

from __future__ import annotations

import json

from microscale.serve.tool_parsers.base import (
    FunctionTool,
    ParsedReply,
    ToolParser,
    call_from_object,
    json_rule,
    named_call_schema,
)

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def _held_back(text: str) -> int:
    """How many trailing characters could be the start of `<tool_call>` (they wait for the next token)."""
    for n in range(min(len(_OPEN) - 1, len(text)), 0, -1):
        if _OPEN.startswith(text[-n:]):
            return n
    return 0


class HermesParser(ToolParser):
    name = "hermes"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return _OPEN in template

    def parse(self, text: str, token_ids: list[int], finished: bool) -> ParsedReply:
        content, calls = [], []
        position = 0
        while True:
            start = text.find(_OPEN, position)
            if start < 0:
                tail = text[position:]
                content.append(tail if finished else tail[: len(tail) - _held_back(tail)])
                break
            content.append(text[position:start])
            end = text.find(_CLOSE, start)
            if end < 0 and not finished:
                break  # a call still being written
            body = text[start + len(_OPEN): end if end >= 0 else len(text)]
            try:
                call = call_from_object(json.loads(body), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            block = text[start: end + len(_CLOSE) if end >= 0 else len(text)]
            if call:
                calls.append(call)
            else:
                content.append(block)  # a malformed block stays visible as text
            if end < 0:
                break
            position = end + len(_CLOSE)
        # Blank lines around calls are layout, not content (and trailing ones may yet precede a call).
        return ParsedReply(content="".join(content).strip(), tool_calls=tuple(calls))

    @classmethod
    def grammar(cls, tools: list[FunctionTool], parallel: bool) -> str:
        # The markers are single added tokens in these vocabularies (llguidance names them as special tokens).
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
        return "\n".join([start, 'call: <tool_call> "\\n" body "\\n" </tool_call>',
                          f"body: {json_rule(named_call_schema(tools, 'arguments'))}"])
