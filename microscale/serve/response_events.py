"""A reply's output items (reasoning, then the message), and the Responses stream events that build them: each item
is added, its content part added, its text streamed as deltas, then the text, the part and the item are done
before the next item starts; every event carries the next sequence_number.

Both the non-streamed response and the streamed `response.completed` take their items from `output_items` over the
whole reply, so the two are the same object; the deltas are what each reply snapshot added to the one before."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from microscale.serve.responses_protocol import (
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseObject,
)

Kind = Literal["reasoning", "message"]
_ORDER: tuple[Kind, ...] = ("reasoning", "message")  # the order items take in the output


@dataclass(frozen=True)
class ReplyPart:
    """One output item's worth of a reply: its kind and its text so far."""

    kind: Kind
    text: str


def reply_parts(reasoning: str, content: str, finished: bool) -> list[ReplyPart]:
    """A reply's items in output order. The message is left out while it has no text, and at the end too when the
    reply has reasoning (a gpt-oss reply cut short while thinking has only that)."""
    parts = [ReplyPart("reasoning", reasoning)] if reasoning else []
    if content or (finished and not parts):
        parts.append(ReplyPart("message", content))
    return parts


def item_id(kind: Kind, response_hex: str) -> str:
    return {"reasoning": "rs_", "message": "msg_"}[kind] + response_hex


def output_item(part: ReplyPart, response_hex: str, status: str) -> OutputItem:
    if part.kind == "reasoning":
        return OutputReasoning(id=item_id("reasoning", response_hex), content=[ReasoningText(text=part.text)],
                               status=status)
    return OutputMessage(id=item_id("message", response_hex), content=[OutputText(text=part.text)], status=status)


def output_items(parts: list[ReplyPart], response_hex: str, incomplete: bool) -> list[OutputItem]:
    """The last item of a reply cut short (max_output_tokens) is incomplete."""
    return [output_item(p, response_hex, "incomplete" if incomplete and i == len(parts) - 1 else "completed")
            for i, p in enumerate(parts)]


def _item_text(item: OutputItem) -> str:
    return item.content[0].text


def _part(kind: Kind, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """Server-sent events for one streamed response, in order."""

    def __init__(self, response_hex: str) -> None:
        self.response_hex = response_hex
        self._sequence = 0
        self._output_index: dict[Kind, int] = {}  # items added so far
        self._sent: dict[Kind, str] = {}  # text streamed per item
        self._open: Kind | None = None

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
            if part.kind in self._output_index:
                if part.kind == self._open:
                    events += self._delta(part.kind, part.text)
                continue
            if any(_ORDER.index(k) > _ORDER.index(part.kind) for k in self._output_index):
                continue
            events += self._close(None) + self._add(part.kind) + self._delta(part.kind, part.text)
        return events

    def finish(self, items: list[OutputItem]) -> list[str]:
        """Every item of the final response done (added first if no delta came for it)."""
        events: list[str] = []
        for item in items:
            kind: Kind = item.type
            if kind not in self._output_index:
                events += self._close(None) + self._add(kind)
            if kind == self._open:
                events += self._delta(kind, _item_text(item)) + self._close(item)
        return events + self._close(None)

    def _add(self, kind: Kind) -> list[str]:
        self._output_index[kind] = len(self._output_index)
        self._sent[kind] = ""
        self._open = kind
        index, added = self._output_index[kind], output_item(ReplyPart(kind, ""), self.response_hex, "in_progress")
        item = added.model_dump(mode="json")
        item["content"] = []  # parts arrive with content_part.added
        return [
            self.event("response.output_item.added", output_index=index, item=item),
            self.event("response.content_part.added", item_id=added.id, output_index=index, content_index=0,
                       part=_part(kind, "")),
        ]

    def _delta(self, kind: Kind, text: str) -> list[str]:
        sent = self._sent[kind]
        if len(text) <= len(sent) or not text.startswith(sent):
            return []
        self._sent[kind] = text
        fields = dict(item_id=item_id(kind, self.response_hex), output_index=self._output_index[kind],
                      content_index=0, delta=text[len(sent):])
        if kind == "reasoning":
            return [self.event("response.reasoning_text.delta", **fields)]
        return [self.event("response.output_text.delta", **fields, logprobs=[])]

    def _close(self, final: OutputItem | None) -> list[str]:
        """The open item's done events: with the final response's item, or (None) with the text streamed so far."""
        kind = self._open
        if kind is None:
            return []
        self._open = None
        item = final or output_item(ReplyPart(kind, self._sent[kind]), self.response_hex, "completed")
        text, index = _item_text(item), self._output_index[kind]
        where = dict(item_id=item.id, output_index=index, content_index=0)
        if kind == "reasoning":
            text_done = self.event("response.reasoning_text.done", **where, text=text)
        else:
            text_done = self.event("response.output_text.done", **where, text=text, logprobs=[])
        return [
            text_done,
            self.event("response.content_part.done", **where, part=_part(kind, text)),
            self.event("response.output_item.done", output_index=index, item=item.model_dump(mode="json")),
        ]
