"""Perplexity with a sliding window: windows of `context` tokens start every `stride` tokens; each window
scores only the tokens the previous one did not (after the first window, each scored token sees at least
context - stride tokens before it). stride = context gives consecutive, non-overlapping windows."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from microscale.engine.engine import LLMEngine


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens predicted
    windows: int


def sliding_windows(num_tokens: int, context: int, stride: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(window start, window end, first scored position) over tokens [0, num_tokens); a position p is scored
    from the logits at p - 1, so position 0 never is."""
    stride = stride or context
    if context < 2 or not 0 < stride <= context:
        raise ValueError(f"Need context >= 2 and 0 < stride <= context; got context={context}, stride={stride}.")
    scored_until = 1
    for start in range(0, num_tokens, stride):
        end = min(start + context, num_tokens)
        if end - start >= 2 and end > scored_until:
            yield start, end, max(scored_until, start + 1)
            scored_until = end
        if end == num_tokens:
            break


def window_logits(engine: LLMEngine, ids: list[int], context: int, stride: int | None,
                  max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each window: (logits predicting its scored tokens [n, vocab] float32, those tokens [n])."""
    for count, (start, end, first) in enumerate(sliding_windows(len(ids), context, stride)):
        if max_windows is not None and count >= max_windows:
            return
        logits = engine.prompt_logits(ids[start:end])
        yield logits[first - start - 1 : end - start - 1], torch.tensor(ids[first:end], device=logits.device)


def perplexity(engine: LLMEngine, text: str, context: int = 512, stride: int | None = None,
               max_windows: int | None = None) -> PerplexityResult:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 2:
        raise ValueError("The text is too short to score (fewer than 2 tokens).")
    total_nll, total_tokens, windows = 0.0, 0, 0
    for logits, targets in window_logits(engine, ids, context, stride, max_windows):
        total_nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        total_tokens += len(targets)
        windows += 1
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens, windows=windows)
