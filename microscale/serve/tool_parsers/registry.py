"""Which parser reads a model's replies: the one `--tool-call-parser` names, else the one whose format the chat
template writes."""

from __future__ import annotations

from microscale.serve.tool_parsers.base import ParsedReply, ReplyParser, ToolParser
from microscale.serve.tool_parsers.harmony import HarmonyParser
from microscale.serve.tool_parsers.hermes import HermesParser
from microscale.serve.tool_parsers.llama_json import Llama3JsonParser
from microscale.tokenizer import Tokenizer

_FAMILIES: tuple[type[ToolParser], ...] = (HarmonyParser, HermesParser, Llama3JsonParser)
# vLLM calls the harmony parser "openai": its users' --tool-call-parser value works here too.
PARSER_NAMES: dict[str, type[ToolParser]] = {cls.name: cls for cls in _FAMILIES} | {"openai": HarmonyParser}


class PlainParser(ReplyParser):
    """No format: the whole reply is content."""

    def parse(self, text: str, token_ids: list[int], finished: bool) -> ParsedReply:
        return ParsedReply(content=text)


def tool_family(tokenizer: Tokenizer, name: str | None) -> type[ToolParser] | None:
    """The family `name` picks, else the one the chat template writes, else None (the model has no tool format)."""
    if name is not None:
        if name not in PARSER_NAMES:
            raise ValueError(f"Unknown tool-call parser {name!r}; choose one of {', '.join(sorted(PARSER_NAMES))}.")
        return PARSER_NAMES[name]
    template = tokenizer.chat_template or ""
    return next((cls for cls in _FAMILIES if cls.matches_template(template)), None)


def reply_parser(tokenizer: Tokenizer, family: type[ToolParser] | None, with_tools: bool) -> ReplyParser:
    """The parser for one request's replies. Harmony replies are split into channels with or without tools;
    the other families' markers mean something only when the request offered tools."""
    if family is HarmonyParser:
        return HarmonyParser(tokenizer, with_tool_calls=with_tools)
    if family is not None and with_tools:
        return family(tokenizer)
    return PlainParser(tokenizer)
