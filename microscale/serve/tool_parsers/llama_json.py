"""Llama 3.x JSON tool calls: a reply that is `{"name": ..., "parameters": {...}}` (several joined by `;`),
possibly after the `<|python_tag|>` special token (dropped from the text). A reply that starts otherwise is
content; whether one that starts with `{` is a call is known only once its object closes."""

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

_DECODER = json.JSONDecoder()


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return "<|python_tag|>" in template or "Environment: ipython" in template

    def parse(self, text: str, token_ids: list[int], finished: bool) -> ParsedReply:
        body = text.lstrip()
        if not body:
            return ParsedReply(content=text if finished else "")
        if not body.startswith("{"):
            return ParsedReply(content=text)
        calls, position = [], 0
        while True:
            while position < len(body) and body[position] in " \t\n;":
                position += 1
            try:
                value, end = _DECODER.raw_decode(body, position)
            except json.JSONDecodeError:
                break
            call = call_from_object(value, ("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
            position = end
        if not calls:  # a JSON answer, not a call
            return ParsedReply(content=text if finished else "")
        # What follows the calls is known to be content only at the end (it may be another call being written).
        return ParsedReply(content=body[position:].strip() if finished else "", tool_calls=tuple(calls))

    @classmethod
    def grammar(cls, tools: list[FunctionTool], parallel: bool) -> str:
        start = 'start: call ("; " call)*' if parallel else "start: call"
        return "\n".join([start, f"call: {json_rule(named_call_schema(tools, 'parameters'))}"])
