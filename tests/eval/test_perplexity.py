"""Perplexity: the engine's windows scored exactly as transformers' cross-entropy over the same windows."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BUNDLED_MODEL, REPO
from hf_reference import hf_model, small_llm

from microscale.eval.perplexity import perplexity

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
