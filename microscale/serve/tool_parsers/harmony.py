"""gpt-oss's harmony format: the `analysis` channel becomes reasoning, `final` (and `commentary` without a
recipient: a preamble) content, and a message addressed `to=functions.NAME` a tool call whose body is its JSON
arguments.

The prompt ends with `<|start|>assistant`, so a reply reads `<|channel|>analysis<|message|>...<|end|>
<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>`
(the recipient may also stand before the channel: `<|start|>assistant to=functions.x<|channel|>commentary json`).
The markers are special tokens, which the detokenizer drops from the text, so the parse reads the token ids
decoded with special tokens kept.
"""

from __future__ import annotations

import re

from microscale.serve.tool_parsers.base import COMPACT, FunctionTool, ParsedReply, ToolCall, ToolParser, json_rule
from microscale.tokenizer import Tokenizer

_START, _MESSAGE, _CHANNEL = "<|start|>", "<|message|>", "<|channel|>"
_MESSAGE_ENDS = re.compile(r"<\|end\|>|<\|call\|>|<\|return\|>")
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*(\w+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_FUNCTIONS = "functions."
# A header without <|message|>: an optional role, an optional channel, then the message's text.
_UNMARKED = re.compile(r"((?:assistant)?\s*(?:<\|channel\|>\s*\w+)?)\s*(.*)", re.DOTALL)


class HarmonyParser(ToolParser):
    name = "harmony"

    def __init__(self, tokenizer: Tokenizer, with_tool_calls: bool = True) -> None:
        super().__init__(tokenizer)
        # Without tools in the request, a call the model writes anyway is not reported (nobody asked for it).
        self.with_tool_calls = with_tool_calls

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return _CHANNEL in template and _MESSAGE in template

    def parse(self, text: str, token_ids: list[int], finished: bool) -> ParsedReply:
        raw = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        if not finished:
            raw = raw.rstrip("\ufffd")  # half a UTF-8 character: it waits for its next token
        reasoning, content, calls = [], [], []
        headed = False
        for part in raw.split(_START):
            header, has_body, body = part.partition(_MESSAGE)
            end = _MESSAGE_ENDS.search(body if has_body else header)
            if not has_body:
                if not end:  # a header still being written (or no harmony at all)
                    continue
                # A message whose <|message|> the model left out: what follows the channel is its text, as
                # openai-harmony's non-strict parser reads it.
                header, body = _UNMARKED.match(header[: end.start()]).groups()
            elif end:
                body = body[: end.start()]
            headed = True
            recipient = _RECIPIENT.search(header)
            if recipient:
                # Other recipients are gpt-oss's built-in tools (browser, python), not the client's functions.
                target = recipient.group(1)
                if self.with_tool_calls and target.startswith(_FUNCTIONS):
                    calls.append(ToolCall(target[len(_FUNCTIONS):], body))
                continue
            channel = _CHANNEL_NAME.search(header)
            (reasoning if channel and channel.group(1) == "analysis" else content).append(body)
        if not headed:
            # A reply that never opened a message: all plain text, known only once it ends.
            return ParsedReply(content=text) if finished else ParsedReply()
        return ParsedReply("".join(content), "".join(reasoning), tuple(calls))

    @classmethod
    def grammar(cls, tools: list[FunctionTool], parallel: bool) -> str:
        # gpt-oss ends its turn at <|call|> (a stop token): one call per reply, whatever `parallel` says.
        rules = [f'start: {" | ".join(f"call_{i}" for i in range(len(tools)))}']
        for i, tool in enumerate(tools):
            rules.append(f'call_{i}: <|channel|> "commentary to=functions.{tool.name} " <|constrain|> "json" '
                         f"<|message|> args_{i} <|call|>")
            rules.append(f"args_{i}: {json_rule(tool.parameters, COMPACT)}")  # gpt-oss writes arguments compact
        return "\n".join(rules)
