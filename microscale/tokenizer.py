"""Tokenizer: HF `tokenizers` for text <-> ids, jinja2 for the chat template, read from the model folder."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

# Names a message's reasoning comes under; templates read `thinking` (gpt-oss) or `reasoning_content` (most others).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; chat templates want plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _alias_reasoning(message: Any) -> Any:
    """A copy of the message with its reasoning under both `thinking` and `reasoning_content`, as transformers does."""
    if not isinstance(message, dict):
        return message
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_chat_template(template: str) -> str:
    """A chat template given as vLLM's --chat-template takes it: a file's path, else (holding a brace or a newline)
    the Jinja text itself, its backslash escapes (\\n) read as a shell user means them. Checked to compile."""
    try:
        text = Path(template).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        if not any(c in template for c in "{}\n"):
            raise ValueError(f"chat_template {template!r} looks like a file path, but it cannot be read: {e}") from None
        # Characters beyond latin-1 pass through the escape decoding as \\u escapes of their own.
        text = template.encode("latin-1", "backslashreplace").decode("unicode_escape")
    try:
        Tokenizer._compiled_template(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template does not compile: {e.message} (line {e.lineno}).") from None
    return text


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any]) -> None:
        self._tok = tokenizer
        self.config = config
        self.bos_token = token_text(config.get("bos_token"))
        self.eos_token = token_text(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template: str | None = config.get("chat_template")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; microscale needs a fast (tokenizers) tokenizer.")
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text())
        template_file = path / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text()
        if isinstance(config.get("chat_template"), list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in config["chat_template"]}
            config["chat_template"] = named.get("default", next(iter(named.values())))
        return cls(HFTokenizer.from_file(str(path / "tokenizer.json")), config)

    def to_json(self) -> str:
        """The tokenizer.json text (for libraries that build their own view of the vocabulary)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise ValueError("This model's tokenizer_config.json has no chat_template; use generate() instead.")
        special = {k: token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        # tools/documents are None, not undefined, when not given: templates test `tools is not none`.
        context = {"tools": None, "documents": None, **special, **kwargs}
        try:
            return self._compiled_template(self.chat_template).render(
                context, messages=[_alias_reasoning(m) for m in messages], add_generation_prompt=add_generation_prompt
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"Chat template failed: {e}") from e

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def _compiled_template(source: str) -> jinja2.Template:
        """Compiled once per template text: compiling gpt-oss's costs ~0.2 s, far more than rendering it."""
        # The environment transformers renders chat templates in (utils/chat_template_utils.py).
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # `datetime` looked up per render
        return env.from_string(source)
