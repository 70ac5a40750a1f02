"""Tool-call parsers per model family (harmony, Hermes, Llama 3 JSON): replies into content, reasoning and calls,
and the grammars that make a reply a valid call."""

from microscale.serve.tool_parsers.base import (
    FunctionTool,
    ParsedReply,
    ReplyParser,
    ToolCall,
    ToolParser,
    template_arguments,
)
from microscale.serve.tool_parsers.registry import PARSER_NAMES, reply_parser, tool_family

__all__ = [
    "PARSER_NAMES", "FunctionTool", "ParsedReply", "ReplyParser", "ToolCall", "ToolParser",
    "reply_parser", "template_arguments", "tool_family",
]
