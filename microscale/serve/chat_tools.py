"""A chat request's tools: the messages and tool definitions the chat template renders, the grammar that
`tool_choice` "required" or a named function puts on decoding, and the parse of each reply. 400s name the field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from microscale.sampling_params import StructuredOutputsParams
from microscale.serve.errors import APIError
from microscale.serve.protocol import ChatCompletionRequest, ChatMessage, ChatTool
from microscale.serve.tool_parsers import FunctionTool, ParsedReply, ReplyParser, ToolParser, reply_parser
from microscale.tokenizer import Tokenizer

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: a developer message is a system message; an assistant's calls carry
    their arguments as objects (templates write them with `tojson`); a tool result must answer an earlier call."""
    rendered, call_ids = [], set()
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": message.text()}
        if message.tool_calls:
            if message.role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls.",
                               f"messages[{i}].tool_calls")
            if not entry["content"]:
                del entry["content"]  # gpt-oss's template reads a present content as the call's analysis
            entry["tool_calls"] = [_template_call(i, j, call) for j, call in enumerate(message.tool_calls)]
            call_ids.update(call.id for call in message.tool_calls)
        if message.role == "tool":
            if message.tool_call_id not in call_ids:
                raise APIError(400, f"messages[{i}]: a tool message must answer a tool call of an earlier assistant "
                               f"message; no call has id {message.tool_call_id!r}.", f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        rendered.append(entry)
    return rendered


def _template_call(i: int, j: int, call) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON.",
                       f"messages[{i}].tool_calls") from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


@dataclass
class RequestTools:
    """What the request's `tools`, `tool_choice` and `parallel_tool_calls` ask of the reply."""

    tools: list[FunctionTool]
    definitions: list[dict[str, Any]]  # for the chat template, as the client sent them
    choice: str  # "none", "auto", "required", or a function's name
    parallel: bool
    family: type[ToolParser] | None

    @classmethod
    def from_request(cls, body: ChatCompletionRequest, family: type[ToolParser] | None) -> RequestTools:
        choice = body.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = choice.function.name
        return cls.build(body.tools or [], choice, body.parallel_tool_calls, family)

    @classmethod
    def build(
        cls, tools: list[ChatTool], choice: str | None, parallel: bool, family: type[ToolParser] | None
    ) -> RequestTools:
        """`choice`: "none", "auto", "required" or a function's name; None: "auto" with tools, else "none". The
        Responses API's requests come here too."""
        if choice is None:
            choice = "auto" if tools else "none"
        if not tools and choice != "none":
            raise APIError(400, "tool_choice is only allowed when tools are given.", "tool_choice")
        names = [tool.function.name for tool in tools]
        if len(set(names)) != len(names):
            raise APIError(400, "tools: two tools have the same name.", "tools")
        if choice not in ("none", "auto", "required") and choice not in names:
            raise APIError(400, f"tool_choice names the function {choice!r}, which is not among the tools "
                           f"({', '.join(names)}).", "tool_choice")
        if tools and choice != "none" and family is None:
            raise APIError(400, "tools: this model's chat template writes no tool-call format microscale knows; "
                           "start the server with --tool-call-parser to choose one.", "tools")
        return cls(
            tools=[FunctionTool(tool.function.name, tool.function.parameters or _ANY_OBJECT) for tool in tools],
            definitions=[tool.model_dump(exclude_none=True) for tool in tools],
            choice=choice, parallel=parallel, family=family,
        )

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        # tool_choice "none": the model is not told of tools it may not call.
        return self.definitions if self.offered else None

    def constraint(self) -> StructuredOutputsParams | None:
        """"required" and a named function: decoding may only write calls whose arguments follow their schema."""
        if self.choice in ("none", "auto"):
            return None
        tools = self.tools if self.choice == "required" else [t for t in self.tools if t.name == self.choice]
        return StructuredOutputsParams(grammar=self.family.grammar(tools, self.parallel))

    def reader(self, tokenizer: Tokenizer) -> ReplyReader:
        return ReplyReader(reply_parser(tokenizer, self.family, self.offered), self.parallel)


@dataclass
class ReplyReader:
    """A request's replies parsed, keeping only the first call when parallel_tool_calls is false."""

    parser: ReplyParser
    parallel: bool

    def __call__(self, text: str, token_ids: list[int], finished: bool) -> ParsedReply:
        reply = self.parser.parse(text, token_ids, finished)
        if self.parallel or len(reply.tool_calls) <= 1:
            return reply
        return ParsedReply(reply.content, reply.reasoning, reply.tool_calls[:1])
