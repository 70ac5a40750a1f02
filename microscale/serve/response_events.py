"""A parsed reply's output items (reasoning, then the message, then function calls), and the Responses stream events
that build them: each item is added (with its content part), its text or arguments streamed as deltas, then done,
before the next item starts; every event carries the next sequence_number.

Both the non-streamed response and the streamed `response.completed` take their items from `output_items` over the
whole reply, so the two are the same object. The deltas are what each parse of the reply so far added to the one
before; the parsers are monotone (tool_parsers/base.py), so the deltas add up to the final items."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from microscale.serve.responses_protocol import (
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseObject,
)
from microscale.serve.tool_parsers import ParsedReply

Kind = Literal["reasoning", "message", "function_call"]


@dataclass(frozen=True)
class ReplyPart:
    """One output item's worth of a reply: its text so far (a call's arguments), and a call's name and index."""

    kind: Kind
    text: str
    name: str = ""
    index: int = 0

    @property
    def key(self) -> tuple[int, int]:
        """Its place in the output: reasoning, the message, then the calls in order."""
        return ("reasoning", "message", "function_call").index(self.kind), self.index


def reply_parts(reply: ParsedReply, finished: bool) -> list[ReplyPart]:
    """A reply's items in output order. The message is left out while it has no text, and at the end too when the
    reply has anything else (only calls; a gpt-oss reply cut short while thinking)."""
    parts = [ReplyPart("reasoning", reply.reasoning)] if reply.reasoning else []
    calls = [ReplyPart("function_call", c.arguments, c.name, i) for i, c in enumerate(reply.tool_calls)]
    if reply.content or (finished and not parts and not calls):
        parts.append(ReplyPart("message", reply.content))
    return parts + calls


def output_item(part: ReplyPart, response_hex: str, status: str) -> OutputItem:
    """Item ids follow from the response's: the stream and the stored response name each item the same."""
    if part.kind == "reasoning":
        return OutputReasoning(id=f"rs_{response_hex}", content=[ReasoningText(text=part.text)], status=status)
    if part.kind == "message":
        return OutputMessage(id=f"msg_{response_hex}", content=[OutputText(text=part.text)], status=status)
    return OutputFunctionCall(id=f"fc_{response_hex}_{part.index}", call_id=f"call_{response_hex}_{part.index}",
                              name=part.name, arguments=part.text, status=status)


def output_items(parts: list[ReplyPart], response_hex: str, incomplete: bool) -> list[OutputItem]:
    """The last item of a reply cut short (max_output_tokens) is incomplete."""
    return [output_item(p, response_hex, "incomplete" if incomplete and i == len(parts) - 1 else "completed")
            for i, p in enumerate(parts)]


def _item_text(item: OutputItem) -> str:
    return item.arguments if isinstance(item, OutputFunctionCall) else item.content[0].text


def _content_part(kind: Kind, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """Server-sent events for one streamed response, in order."""

    def __init__(self, response_hex: str) -> None:
        self.response_hex = response_hex
        self._sequence = 0
        self._output_index: dict[tuple[int, int], int] = {}  # items added so far, by key
        self._sent: dict[tuple[int, int], str] = {}  # text streamed per item
        self._open: ReplyPart | None = None  # the item being streamed (its text: what was sent)

    def event(self, type_: str, **fields: Any) -> str:
        payload = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {type_}\ndata: {json.dumps(payload)}\n\n"

    def lifecycle(self, type_: str, response: ResponseObject) -> str:
        """response.created / in_progress / completed / incomplete."""
        return self.event(type_, response=response.dump())

    def update(self, parts: list[ReplyPart]) -> list[str]:
        """Events for what the reply gained. Text an item gains after a later item started (a model that goes
        back to thinking after answering) is not streamed; the final response holds it."""
        events: list[str] = []
        for part in parts:
            if part.key not in self._output_index:
                if any(key > part.key for key in self._output_index):
                    continue
                events += self._close(None) + self._add(part)
            if self._open is not None and part.key == self._open.key:
                events += self._delta(part)
        return events

    def finish(self, parts: list[ReplyPart], items: list[OutputItem]) -> list[str]:
        """Every item of the final response (`items`, made of the final `parts`) done, added first if nothing of it
        was streamed."""
        events: list[str] = []
        for part, item in zip(parts, items, strict=True):
            if part.key not in self._output_index:
                events += self._close(None) + self._add(part)
            if self._open is not None and part.key == self._open.key:
                events += self._delta(part) + self._close(item)
        return events + self._close(None)

    def _add(self, part: ReplyPart) -> list[str]:
        index = self._output_index[part.key] = len(self._output_index)
        self._sent[part.key] = ""
        self._open = part
        added = output_item(ReplyPart(part.kind, "", part.name, part.index), self.response_hex, "in_progress")
        item = added.model_dump(mode="json")
        if part.kind == "function_call":
            return [self.event("response.output_item.added", output_index=index, item=item)]
        item["content"] = []  # parts arrive with content_part.added
        return [
            self.event("response.output_item.added", output_index=index, item=item),
            self.event("response.content_part.added", item_id=added.id, output_index=index, content_index=0,
                       part=_content_part(part.kind, "")),
        ]

    def _delta(self, part: ReplyPart) -> list[str]:
        sent = self._sent[part.key]
        if len(part.text) <= len(sent) or not part.text.startswith(sent):
            return []
        self._sent[part.key] = part.text
        where = dict(item_id=output_item(part, self.response_hex, "in_progress").id,
                     output_index=self._output_index[part.key])
        delta = part.text[len(sent):]
        if part.kind == "function_call":
            return [self.event("response.function_call_arguments.delta", **where, delta=delta)]
        if part.kind == "reasoning":
            return [self.event("response.reasoning_text.delta", **where, content_index=0, delta=delta)]
        return [self.event("response.output_text.delta", **where, content_index=0, delta=delta, logprobs=[])]

    def _close(self, final: OutputItem | None) -> list[str]:
        """The open item's done events: with the final response's item, or (None) with the text streamed so far."""
        part = self._open
        if part is None:
            return []
        self._open = None
        sent = ReplyPart(part.kind, self._sent[part.key], part.name, part.index)
        item = final or output_item(sent, self.response_hex, "completed")
        text, index = _item_text(item), self._output_index[part.key]
        if part.kind == "function_call":
            events = [self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                 arguments=text)]
        else:
            where = dict(item_id=item.id, output_index=index, content_index=0)
            if part.kind == "reasoning":
                events = [self.event("response.reasoning_text.done", **where, text=text)]
            else:
                events = [self.event("response.output_text.done", **where, text=text, logprobs=[])]
            events.append(self.event("response.content_part.done", **where, part=_content_part(part.kind, text)))
        return events + [self.event("response.output_item.done", output_index=index,
                                    item=item.model_dump(mode="json"))]
