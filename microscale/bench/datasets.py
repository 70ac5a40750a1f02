"""Benchmark datasets for `microscale bench`: synthetic random tokens, ShareGPT conversations, or a text file."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microscale.tokenizer import Tokenizer

# ShareGPT filters, as vLLM's benchmark applies them (benchmarks/datasets.py: is_valid_sequence).
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None  # the text, when the dataset has one (ShareGPT, text file)


@dataclass
class Dataset:
    requests: list[BenchRequest]
    name: str  # "random", "sharegpt", or "text"
    skipped: dict[str, int]  # reason -> count of entries left out (ShareGPT); {} otherwise


def special_token_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids of the added tokens marked special in tokenizer.json (BOS, EOS, chat markers, ...)."""
    return {i for i, token in tokenizer._tok.get_added_tokens_decoder().items() if token.special}


def load_dataset(
    dataset_path: str,
    tokenizer: Tokenizer,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int,
    range_ratio: float = 0.0,
    sharegpt_output_len: int | None = None,
    max_model_len: int | None = None,
) -> Dataset:
    """`dataset_path` is "random", a ShareGPT JSON file, or a text file to slice prompts from.

    input_len, output_len and range_ratio size the random and text-file requests; ShareGPT takes its lengths from
    the conversations (sharegpt_output_len fixes the output length).
    """
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    for name, value in (("sharegpt_output_len", sharegpt_output_len), ("max_model_len", max_model_len)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 when given, got {value}")

    if dataset_path == "random":
        return _random_dataset(tokenizer, num_prompts, input_len, output_len, seed, range_ratio)
    path = Path(dataset_path)
    if not path.is_file():
        raise ValueError(
            f"Dataset {dataset_path!r} is not a file; give a ShareGPT .json file, a text file, or 'random'"
        )
    text = path.read_text(encoding="utf-8")
    entries = _json_list(path, text)
    if entries is not None:
        return _sharegpt_dataset(entries, tokenizer, num_prompts, seed, sharegpt_output_len, max_model_len)
    return _text_dataset(path, text, tokenizer, num_prompts, input_len, output_len, seed, range_ratio)


def _length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    # As vLLM's --random-range-ratio: lengths spread evenly around the target, never below one token.
    return max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))


def _draw_lengths(rng: random.Random, input_len: int, output_len: int, range_ratio: float) -> tuple[int, int]:
    return rng.randint(*_length_bounds(input_len, range_ratio)), rng.randint(*_length_bounds(output_len, range_ratio))


def _random_dataset(
    tokenizer: Tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int, range_ratio: float
) -> Dataset:
    # Special tokens (EOS, chat markers) in a prompt would change what the model does, not just how long it runs.
    special = special_token_ids(tokenizer)
    vocab = [i for i in range(tokenizer.vocab_size) if i not in special]
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        in_len, out_len = _draw_lengths(rng, input_len, output_len, range_ratio)
        requests.append(BenchRequest(prompt_token_ids=rng.choices(vocab, k=in_len), output_len=out_len))
    return Dataset(requests=requests, name="random", skipped={})


def _json_list(path: Path, text: str) -> list[Any] | None:
    """The file's JSON list; None for a text file (not .json and not a JSON list)."""
    is_json = path.suffix == ".json"
    if not is_json and not text.lstrip().startswith("["):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not is_json:
            return None  # text that merely starts with "["
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, list):
        return data
    if is_json:
        raise ValueError(f"{path} must hold a JSON list of ShareGPT entries, got {type(data).__name__}")
    return None


def _first_two_turns(entry: Any) -> tuple[str, str] | None:
    """The prompt and reply of a ShareGPT entry; None if malformed. Later turns are not used, so not checked."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    values = [turn.get("value") if isinstance(turn, dict) else None for turn in turns[:2]]
    if not all(isinstance(v, str) for v in values):
        return None
    return values[0], values[1]


def _sharegpt_dataset(
    entries: list[Any],
    tokenizer: Tokenizer,
    num_prompts: int,
    seed: int,
    sharegpt_output_len: int | None,
    max_model_len: int | None,
) -> Dataset:
    random.Random(seed).shuffle(entries)
    requests: list[BenchRequest] = []
    skipped: Counter[str] = Counter()  # counts the entries passed over before num_prompts were collected
    for entry in entries:
        if len(requests) == num_prompts:
            break
        turns = _first_two_turns(entry)
        if turns is None:
            skipped["malformed"] += 1
            continue
        prompt, reply = turns
        # The prompt as the engine tokenizes a text prompt (with special tokens); the reply counts generated tokens.
        prompt_ids = tokenizer.encode(prompt)
        out_len = sharegpt_output_len or len(tokenizer.encode(reply, add_special_tokens=False))  # validated >= 1
        total = len(prompt_ids) + out_len
        # A fixed output length is the user's choice, so only the prompt is held to the minimum (as vLLM does).
        if len(prompt_ids) < SHAREGPT_MIN_LEN or (sharegpt_output_len is None and out_len < SHAREGPT_MIN_LEN):
            skipped["too_short"] += 1
        elif len(prompt_ids) > SHAREGPT_MAX_PROMPT_LEN or total > SHAREGPT_MAX_TOTAL_LEN:
            skipped["too_long"] += 1
        elif max_model_len is not None and total > max_model_len:
            skipped["over_max_model_len"] += 1
        else:
            requests.append(BenchRequest(prompt_token_ids=prompt_ids, output_len=out_len, prompt=prompt))
    if not requests:
        raise ValueError(f"No usable ShareGPT entries among {len(entries)} (skipped: {dict(skipped) or 'none'})")
    return Dataset(requests=requests, name="sharegpt", skipped=dict(skipped))


def _text_dataset(
    path: Path,
    text: str,
    tokenizer: Tokenizer,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int,
    range_ratio: float,
) -> Dataset:
    tokens = tokenizer.encode(text, add_special_tokens=False)
    longest = _length_bounds(input_len, range_ratio)[1]
    if len(tokens) < longest:
        raise ValueError(f"{path} has {len(tokens)} tokens, fewer than the {longest} an input may need")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        in_len, out_len = _draw_lengths(rng, input_len, output_len, range_ratio)
        start = rng.randint(0, len(tokens) - in_len)
        window = tokens[start : start + in_len]
        # The ids are the request; the decoded text is for display (it may not re-tokenize to the same ids).
        requests.append(BenchRequest(prompt_token_ids=window, output_len=out_len, prompt=tokenizer.decode(window)))
    return Dataset(requests=requests, name="text", skipped={})
