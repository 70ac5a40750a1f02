"""Tiny random models and tokenizers with a tool-call format (imported by test modules): the bundled tokenizer
extended with a family's marker tokens, and that family's real chat template (tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import BUNDLED_MODEL, build_tiny_model
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
HARMONY_MARKERS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
VOCAB_SIZE = 4096 + 16  # room for the added markers


def add_tokens_and_template(folder: Path, tokens: list[str], special: bool, template: str, eos: list[str]) -> Path:
    """Rewrite `folder`'s tokenizer with `tokens` appended, `template` as its chat template, stopping on `eos`."""
    hf = HFTokenizer.from_file(str(BUNDLED_MODEL / "tokenizer.json"))
    hf.add_tokens([AddedToken(t, special=special, normalized=False) for t in tokens])
    hf.save(str(folder / "tokenizer.json"))
    config = json.loads((BUNDLED_MODEL / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = [hf.token_to_id(t) for t in eos]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def tokenizer_folder(folder: Path, tokens: list[str], special: bool, template_file: str, eos: list[str]) -> Path:
    """The bundled tokenizer alone (no weights), extended as add_tokens_and_template does."""
    for name in ("generation_config.json", "special_tokens_map.json"):
        (folder / name).write_text((BUNDLED_MODEL / name).read_text())
    return add_tokens_and_template(folder, tokens, special, (DATA / template_file).read_text(), eos)


def hermes_model(folder: Path) -> Path:
    """A Qwen2 model with Qwen2.5's template: <tool_call> blocks, ending its turn at <|im_end|>."""
    build_tiny_model(folder, "qwen2", vocab_size=VOCAB_SIZE)
    template = (DATA / "qwen2_5_chat_template.jinja").read_text()
    return add_tokens_and_template(folder, ["<tool_call>", "</tool_call>"], False, template,
                                   ["<|endoftext|>", "<|im_end|>"])
