"""Parsed chat replies as OpenAI's bodies: the whole assistant message, or, streamed, per choice what the parse
gained since the last chunk (content, reasoning_content, tool_calls deltas). Because parsers are monotone
(tool_parsers/base.py), the deltas add up to the whole message."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from microscale.serve.protocol import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from microscale.serve.tool_parsers import ParsedReply

Reader = Callable[[str, list[int], bool], ParsedReply]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def assistant_message(reply: ParsedReply) -> AssistantMessage:
    calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
             for c in reply.tool_calls]
    # OpenAI: a reply made only of calls has null content.
    return AssistantMessage(content=reply.content or (None if calls else ""),
                            reasoning_content=reply.reasoning or None, tool_calls=calls or None)


def finish_reason(reason: str | None, has_tool_calls: bool) -> str | None:
    """A reply that ends in calls finishes with "tool_calls" (the client is to run them), as OpenAI's do."""
    return "tool_calls" if reason == "stop" and has_tool_calls else reason


class ReplyDeltas:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self._sent: dict[int, ParsedReply] = {}
        self._call_ids: dict[int, list[str]] = {}

    def has_tool_calls(self, index: int) -> bool:
        return bool(self._sent.get(index, ParsedReply()).tool_calls)

    def delta(self, index: int, text: str, token_ids: list[int], finished: bool) -> DeltaMessage:
        now = self.reader(text, token_ids, finished)
        before = self._sent.get(index, ParsedReply())
        self._sent[index] = now
        ids = self._call_ids.setdefault(index, [])
        calls = []
        for i, call in enumerate(now.tool_calls):
            if i >= len(before.tool_calls):
                ids.append(new_call_id())
                calls.append(DeltaToolCall(index=i, id=ids[i], type="function",
                                           function=DeltaFunctionCall(name=call.name, arguments=call.arguments)))
            elif grown := call.arguments[len(before.tool_calls[i].arguments):]:
                calls.append(DeltaToolCall(index=i, function=DeltaFunctionCall(arguments=grown)))
        return DeltaMessage(content=now.content[len(before.content):] or None,
                            reasoning_content=now.reasoning[len(before.reasoning):] or None,
                            tool_calls=calls or None)
