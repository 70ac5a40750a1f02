"""Benchmark datasets: random requests (lengths, seeding, no special ids), ShareGPT (filters and skip counts as
vLLM's benchmark, malformed entries counted not fatal), text-file slices, and the errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microscale.bench.datasets import BenchRequest, load_dataset, special_token_ids
from microscale.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = ROOT / "models" / "tiny-llama-pycode"
TEXT_FILE = ROOT / "data" / "pycode-valid.txt"

GOOD = [
    ("def add(a, b):\n    return a + b\n", "Adds two numbers and returns their sum."),
    ("How do I reverse a list in Python?", "Use reversed(xs) or xs[::-1] to get a reversed copy."),
    (
        "Write a function that checks whether a number is prime.",
        "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n",
    ),
    (
        "Explain list comprehensions briefly, please.",
        "They build a list from an iterable in one expression: [x * x for x in xs].",
    ),
]
SHORT_REPLY = ("What does `pass` do in a Python function body?", "ok")  # usable once the output length is fixed
LONG_PROMPT = "x = 1\n" * 210  # over 1024 tokens
LONG_TOTAL = ("x = 1\n" * 200, "y = 2\n" * 220)  # a prompt under 1024 tokens, but over 2048 with the reply
MALFORMED = [
    "just a string",  # not a dict
    {"id": "no-conversations"},
    {"id": "not-a-list", "conversations": "hello"},
    {"id": "one-turn", "conversations": [{"from": "human", "value": "Only a question, no answer here."}]},
    {"id": "no-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "An answer."}]},
    {"id": "int-value", "conversations": [{"from": "human", "value": "A question?"}, {"from": "gpt", "value": 5}]},
    {"id": "turn-not-dict", "conversations": ["A question?", {"from": "gpt", "value": "An answer."}]},
]


def conversation(prompt: str, reply: str, i: int = 0) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def file_tokens(tok) -> list[int]:
    return tok.encode(TEXT_FILE.read_text(encoding="utf-8"), add_special_tokens=False)


def load(path, tok, **kwargs):
    args = {"num_prompts": 8, "input_len": 32, "output_len": 16, "seed": 0} | kwargs
    return load_dataset(str(path), tok, **args)


def lengths(reqs: list[BenchRequest]) -> tuple[list[int], list[int]]:
    return [len(r.prompt_token_ids) for r in reqs], [r.output_len for r in reqs]


# --- random ---------------------------------------------------------------------------------------------------


def test_random_exact_lengths(tok):
    ds = load("random", tok, num_prompts=5, input_len=37, output_len=11)
    assert ds.name == "random" and ds.skipped == {}
    assert lengths(ds.requests) == ([37] * 5, [11] * 5)
    assert all(r.prompt is None for r in ds.requests)


def test_random_range_ratio_within_bounds(tok):
    ds = load("random", tok, num_prompts=200, input_len=100, output_len=20, range_ratio=0.5)
    ins, outs = lengths(ds.requests)
    assert all(50 <= n <= 150 for n in ins) and all(10 <= n <= 30 for n in outs)
    assert min(ins) < 100 < max(ins) and min(outs) < 20 < max(outs)  # the ratio really spreads the lengths


def test_random_is_seeded(tok):
    a = load("random", tok, seed=1, range_ratio=0.3)
    assert a == load("random", tok, seed=1, range_ratio=0.3)
    assert a.requests != load("random", tok, seed=2, range_ratio=0.3).requests


def test_random_draws_no_special_ids(tok):
    added = json.loads((BUNDLED_MODEL / "tokenizer.json").read_text())["added_tokens"]
    special = {t["id"] for t in added if t["special"]}
    assert special and special_token_ids(tok) == special
    assert {tok.bos_token_id, tok.eos_token_id} <= special
    drawn = [i for r in load("random", tok, num_prompts=20, input_len=2000).requests for i in r.prompt_token_ids]
    assert not special & set(drawn)
    assert all(0 <= i < tok.vocab_size for i in drawn)
    assert len(set(drawn)) > tok.vocab_size * 0.9  # uniform over the whole vocabulary


# --- ShareGPT --------------------------------------------------------------------------------------------------


def write_json(tmp_path: Path, data, name="sharegpt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def sharegpt(tmp_path, tok) -> Path:
    assert len(tok.encode(LONG_PROMPT)) > 1024 >= len(tok.encode(LONG_TOTAL[0]))
    assert len(tok.encode(LONG_TOTAL[0])) + len(tok.encode(LONG_TOTAL[1], add_special_tokens=False)) > 2048
    entries = (
        [conversation(p, r, i) for i, (p, r) in enumerate(GOOD)]
        + MALFORMED
        + [
            conversation("hi", "A reply that is long enough to count."),  # prompt too short
            conversation(*SHORT_REPLY),  # reply too short
            conversation(LONG_PROMPT, "Fine, that works as it is."),  # prompt too long
            conversation(*LONG_TOTAL),  # prompt + reply too long
        ]
    )
    # Extra turns after the first two are ignored.
    entries[0]["conversations"].append({"from": "human", "value": "And a follow-up."})
    return write_json(tmp_path, entries)


def test_sharegpt_filters_and_counts(sharegpt, tok):
    ds = load(sharegpt, tok, num_prompts=100)
    assert ds.name == "sharegpt"
    assert ds.skipped == {"malformed": 7, "too_short": 2, "too_long": 2}
    assert sorted(r.prompt for r in ds.requests) == sorted(p for p, _ in GOOD)
    replies = dict(GOOD)
    for r in ds.requests:
        assert r.prompt_token_ids == tok.encode(r.prompt)
        assert r.output_len == len(tok.encode(replies[r.prompt], add_special_tokens=False))
        assert r.output_len >= 4


def test_sharegpt_stops_at_num_prompts_and_is_seeded(sharegpt, tok):
    orders = {seed: [r.prompt for r in load(sharegpt, tok, num_prompts=2, seed=seed).requests] for seed in range(6)}
    assert all(len(o) == 2 for o in orders.values())
    assert orders[0] == [r.prompt for r in load(sharegpt, tok, num_prompts=2, seed=0).requests]
    assert len({tuple(o) for o in orders.values()}) > 1  # the shuffle depends on the seed


def test_sharegpt_fixed_output_len(sharegpt, tok):
    ds = load(sharegpt, tok, num_prompts=100, sharegpt_output_len=2)
    assert {r.output_len for r in ds.requests} == {2}  # below the minimum: a fixed length is not filtered
    # A short reply no longer matters, nor a long one; a short prompt and a long prompt still do.
    assert sorted(r.prompt for r in ds.requests) == sorted([p for p, _ in GOOD] + [SHORT_REPLY[0], LONG_TOTAL[0]])
    assert ds.skipped == {"malformed": 7, "too_short": 1, "too_long": 1}


def test_sharegpt_max_model_len(sharegpt, tok):
    totals = {p: len(tok.encode(p)) + len(tok.encode(r, add_special_tokens=False)) for p, r in GOOD}
    limit = sorted(totals.values())[1]  # two entries fit (unless tied), the rest are over
    ds = load(sharegpt, tok, num_prompts=100, max_model_len=limit)
    kept = sorted(p for p, t in totals.items() if t <= limit)
    assert 0 < len(kept) < len(GOOD)
    assert sorted(r.prompt for r in ds.requests) == kept
    assert all(len(r.prompt_token_ids) + r.output_len <= limit for r in ds.requests)
    assert ds.skipped == {"malformed": 7, "too_short": 2, "too_long": 2, "over_max_model_len": len(GOOD) - len(kept)}


def test_sharegpt_json_list_without_json_suffix(tmp_path, tok):
    path = tmp_path / "conversations.data"
    path.write_text(json.dumps([conversation(*GOOD[1])]))
    ds = load(path, tok)
    assert ds.name == "sharegpt" and [r.prompt for r in ds.requests] == [GOOD[1][0]]


def test_sharegpt_nothing_usable(tmp_path, tok):
    path = write_json(tmp_path, MALFORMED + [conversation("hi", "ok")])
    with pytest.raises(ValueError, match="No usable ShareGPT entries.*malformed"):
        load(path, tok)


def test_invalid_json(tmp_path, tok):
    path = tmp_path / "broken.json"
    path.write_text('[{"conversations": ')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load(path, tok)


def test_json_not_a_list(tmp_path, tok):
    path = write_json(tmp_path, {"conversations": []}, name="object.json")
    with pytest.raises(ValueError, match="object.json must hold a JSON list.*dict"):
        load(path, tok)


# --- text file -------------------------------------------------------------------------------------------------


def test_text_file_slices(tok, file_tokens):
    ds = load(TEXT_FILE, tok, num_prompts=6, input_len=64, output_len=16, range_ratio=0.25, seed=3)
    assert ds.name == "text" and ds.skipped == {} and len(ds.requests) == 6
    ins, outs = lengths(ds.requests)
    assert all(48 <= n <= 80 for n in ins) and all(12 <= n <= 20 for n in outs) and len(set(ins)) > 1
    starts = set()
    for r in ds.requests:
        ids = r.prompt_token_ids
        matches = [
            s
            for s in range(len(file_tokens) - len(ids) + 1)
            if file_tokens[s] == ids[0] and file_tokens[s : s + len(ids)] == ids
        ]
        assert matches, "prompt ids are not a contiguous slice of the file's tokens"
        starts.add(matches[0])
        assert r.prompt == tok.decode(ids)
    assert len(starts) == 6  # random offsets, not one window repeated


def test_text_file_seeded_and_exact_lengths(tmp_path, tok):
    path = tmp_path / "small.txt"
    path.write_text("def add(a, b):\n    return a + b\n" * 20)
    a = load(path, tok, num_prompts=4, input_len=10, output_len=3, seed=5)
    assert lengths(a.requests) == ([10] * 4, [3] * 4)
    assert a == load(path, tok, num_prompts=4, input_len=10, output_len=3, seed=5)
    offsets = [load(path, tok, num_prompts=4, input_len=10, output_len=3, seed=s).requests for s in range(4)]
    assert any(o != a.requests for o in offsets)


def test_text_file_too_short(tmp_path, tok):
    path = tmp_path / "tiny.txt"
    path.write_text("def add(a, b):\n    return a + b\n")
    with pytest.raises(ValueError, match="tiny.txt has 12 tokens"):
        load(path, tok, input_len=13)
    assert lengths(load(path, tok, num_prompts=1, input_len=12, output_len=1).requests) == ([12], [1])


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path, tok):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=r"nope\.json.*'random'"):
        load(missing, tok)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_prompts": 0}, "num_prompts"),
        ({"input_len": 0}, "input_len"),
        ({"output_len": -1}, "output_len"),
        ({"range_ratio": 1.0}, "range_ratio"),
        ({"range_ratio": -0.1}, "range_ratio"),
        ({"sharegpt_output_len": 0}, "sharegpt_output_len"),
        ({"max_model_len": 0}, "max_model_len"),
    ],
)
def test_bad_arguments(tok, kwargs, name):
    with pytest.raises(ValueError, match=name):
        load("random", tok, **kwargs)
