"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info, in vLLM's shapes. lm-eval's
API models (`tokenizer_backend=remote`) tokenize through them, so an evaluation needs no tokenizer of its own."""

from __future__ import annotations

from typing import Any

from microscale.engine.inputs import InputProcessor
from microscale.serve.chat_tools import RequestTools, template_messages
from microscale.serve.errors import APIError
from microscale.serve.limits import ServeLimits
from microscale.serve.params import off_loop
from microscale.serve.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from microscale.serve.tool_parsers import ToolParser
from microscale.serve.validation import check_prompt_chars
from microscale.tokenizer import Tokenizer, token_text

# tokenizer_config.json keys that name files on the server, not tokenizer settings (vLLM leaves them out too).
_FILE_KEYS = ("vocab_file", "merges_file", "tokenizer_file")
# What lm-eval's remote tokenizer reads (it requires eos_token to be present, even when null).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


async def tokenize(
    inputs: InputProcessor, body: TokenizeRequest, limits: ServeLimits, tool_family: type[ToolParser] | None,
) -> TokenizeResponse:
    check_prompt_chars(body.prompt_chars(), limits, "prompt" if body.prompt is not None else "messages")
    tokenizer = inputs.tokenizer
    if body.prompt is not None:
        text, add_special = body.prompt, body.add_special_tokens is not False
    else:
        tools = RequestTools.build(body.tools or [], None, True, tool_family).template_tools()
        try:
            text = await off_loop(tokenizer.apply_chat_template, template_messages(body.messages),
                                  add_generation_prompt=body.add_generation_prompt, tools=tools)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        add_special = bool(body.add_special_tokens)
    ids = await off_loop(tokenizer.encode, text, add_special_tokens=add_special)
    token_strs = [tokenizer.id_to_token(t) or "" for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=inputs.max_model_len, tokens=ids, token_strs=token_strs)


async def detokenize(inputs: InputProcessor, body: DetokenizeRequest) -> DetokenizeResponse:
    try:
        inputs.check_vocabulary(body.tokens)
    except ValueError as e:
        raise APIError(400, str(e), "tokens") from None
    # Special tokens stay: a client round-trips what /tokenize gave it.
    return DetokenizeResponse(prompt=await off_loop(inputs.tokenizer.decode, body.tokens, skip_special_tokens=False))


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer's settings as vLLM reports them: tokenizer_config.json without file paths, special tokens as
    their text, plus tokenizer_class and the chat template the server renders with."""
    info = {key: _plain(value) for key, value in tokenizer.config.items() if key not in _FILE_KEYS}
    info.update({key: token_text(tokenizer.config.get(key)) for key in _SPECIAL_TOKENS})
    # transformers loads a bare tokenizer.json as PreTrainedTokenizerFast: the class a client can rebuild it with.
    info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    info["chat_template"] = tokenizer.chat_template
    return info


def _plain(value: Any) -> Any:
    """tokenizer_config.json's AddedToken objects ({"content": ..., "lstrip": ...}) as their text, as vLLM sends."""
    if isinstance(value, dict):
        return value["content"] if isinstance(value.get("content"), str) else {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
