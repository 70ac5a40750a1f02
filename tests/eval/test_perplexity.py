"""Perplexity: the engine's windows scored exactly as transformers' cross-entropy over the same windows."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BUNDLED_MODEL, REPO
from hf_reference import hf_model, small_llm

from microscale.eval.perplexity import perplexity, sliding_windows

TEXT = (REPO / "data" / "pycode-valid.txt").read_text()[:3000]


def test_matches_transformers_cross_entropy() -> None:
    llm = small_llm(BUNDLED_MODEL)
    result = perplexity(llm.engine, TEXT, context=64)
    ids = llm.get_tokenizer().encode(TEXT, add_special_tokens=False)
    hf = hf_model(BUNDLED_MODEL)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            window = torch.tensor([ids[start : start + 64]])
            if window.shape[1] < 2:
                continue
            logits = hf(window).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    assert result.tokens == count and result.windows == math.ceil(len(ids) / 64)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    # A trained model on held-out text of its domain: far better than uniform over 4096 tokens.
    assert result.perplexity < 400


def test_limits_and_errors() -> None:
    llm = small_llm(BUNDLED_MODEL)
    assert perplexity(llm.engine, TEXT, context=32, max_windows=3).windows == 3
    with pytest.raises(ValueError):
        perplexity(llm.engine, "x", context=32)
    with pytest.raises(ValueError):
        perplexity(llm.engine, TEXT, context=1)


@pytest.mark.parametrize("n,context,stride", [(10, 4, 4), (10, 4, 2), (11, 5, 3), (3, 8, 4), (9, 2, 1)])
def test_sliding_windows_score_every_token_once(n, context, stride) -> None:
    """Overlapping windows score every token after the first exactly once; non-overlapping ones (stride ==
    context) every token but each window's first, which has no context in its window."""
    scored, starts = [], []
    for start, end, first in sliding_windows(n, context, stride):
        assert 0 <= start < first <= end <= n and end - start <= context
        scored.extend(range(first, end))
        starts.append(start)
    expected = [p for p in range(1, n) if stride < context or p not in starts]
    assert scored == expected


def test_strided_perplexity_matches_the_transformers_recipe() -> None:
    """The sliding-window recipe of transformers' perplexity guide (labels of already-scored tokens -100)."""
    llm = small_llm(BUNDLED_MODEL)
    text = TEXT[:1500]
    result = perplexity(llm.engine, text, context=64, stride=32)
    ids = torch.tensor([llm.get_tokenizer().encode(text, add_special_tokens=False)])
    hf = hf_model(BUNDLED_MODEL)
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], 32):
            end = min(begin + 64, ids.shape[1])
            target_len = end - prev_end
            window = ids[:, begin:end]
            labels = window.clone()
            labels[:, :-target_len] = -100
            logits = hf(window).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum", ignore_index=-100).item()
            count += (labels[0, 1:] != -100).sum().item()
            prev_end = end
            if end == ids.shape[1]:
                break
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
