"""What every model family's tool-call parser gives and takes.

A parser reads a reply (its text, and its token ids for formats written in special tokens) into content, reasoning
and tool calls. The streamed response is built from snapshots of the same parse on the reply so far, so a parser
must be monotone: on an unfinished reply it reports only what no later token can take back (content and reasoning
that can only grow, calls whose name is final and whose arguments can only grow). Then the concatenated stream
equals the non-streamed response by construction.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from microscale.tokenizer import Tokenizer

# JSON as json.dumps and the chat templates' tojson write it (", " and ": "), no other free whitespace.
SPACED = (", ", ": ")
COMPACT = (",", ":")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


@dataclass(frozen=True)
class ParsedReply:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class FunctionTool:
    name: str
    parameters: dict[str, Any]  # JSON Schema of the arguments object


def json_rule(schema: dict[str, Any], separators: tuple[str, str] = SPACED) -> str:
    """A Lark rule body for JSON following `schema` (llguidance's %json) with the family's separators (item, key)
    and no other free whitespace (which a weak model could fill its budget with)."""
    layout = {"whitespace_flexible": False, "item_separator": separators[0], "key_separator": separators[1]}
    return "%json " + json.dumps({**schema, "x-guidance": layout})


class ReplyParser(ABC):
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @abstractmethod
    def parse(self, text: str, token_ids: list[int], finished: bool) -> ParsedReply:
        """The reply so far (`finished`: all of it); monotone in the reply, see the module docstring."""


class ToolParser(ReplyParser):
    """One model family's reply format. `name` is the --tool-call-parser value that picks it."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def matches_template(cls, template: str) -> bool:
        """The chat template writes this family's tool-call format."""

    @classmethod
    @abstractmethod
    def grammar(cls, tools: list[FunctionTool], parallel: bool) -> str:
        """A Lark grammar (llguidance) for a reply made only of calls to `tools` (one, or several if `parallel`),
        each call's arguments following its tool's schema."""


def named_call_schema(tools: list[FunctionTool], arguments_key: str) -> dict[str, Any]:
    """JSON Schema of `{"name": NAME, <arguments_key>: ARGS}` for any one of `tools` (the JSON-object formats)."""
    return {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    } for tool in tools]}


def template_arguments(arguments: str) -> Any:
    """A call's arguments as chat templates take them: the object (they write it with `tojson`; its JSON text
    would be quoted twice), or the text as it is when the model wrote no valid JSON."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def call_from_object(value: Any, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    """A call written as a JSON object `{"name": ..., "<arguments key>": {...}}`, or None if `value` is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    for key in arguments_keys:
        if key in value:
            return ToolCall(value["name"], json.dumps(value[key], ensure_ascii=False))
    return None
