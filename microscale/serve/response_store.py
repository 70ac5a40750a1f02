"""Stored responses (store=true) for GET /v1/responses/{id} and previous_response_id: each entry keeps the response
object and the whole conversation that led to it (input items of every earlier turn, this turn's input, then its
output items, function calls and their outputs included), as JSON text, so that an evicted ancestor never breaks a
later turn. Least recently used entries go first once either bound (entries, bytes of JSON) is passed."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from microscale.serve.responses_protocol import INPUT_ITEMS, InputItem


@dataclass(frozen=True)
class StoredResponse:
    response_json: bytes
    conversation_json: bytes

    @property
    def size(self) -> int:
        return len(self.response_json) + len(self.conversation_json)

    def conversation(self) -> list[InputItem]:
        return INPUT_ITEMS.validate_json(self.conversation_json)


class ResponseStore:
    def __init__(self, max_responses: int, max_bytes: int) -> None:
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, response_json: bytes, conversation: list[InputItem]) -> None:
        """Keeps it unless it alone is larger than the byte bound (then it is not stored at all)."""
        entry = StoredResponse(response_json, INPUT_ITEMS.dump_json(conversation, by_alias=True, exclude_none=True))
        if entry.size > self.max_bytes or self.max_responses < 1:
            return
        self.delete(response_id)
        self._entries[response_id] = entry
        self.bytes += entry.size
        while len(self._entries) > self.max_responses or self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry is not None
