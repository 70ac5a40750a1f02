"""Perplexity of a model on a text: the text's tokens cut into consecutive windows of `context` tokens, each
scored from its own start (no overlap), every token after a window's first one predicted by the engine's
own prefill path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from microscale.engine.engine import LLMEngine


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens predicted
    windows: int


def perplexity(engine: LLMEngine, text: str, context: int = 512, max_windows: int | None = None) -> PerplexityResult:
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}.")
    windows = [ids[start : start + context] for start in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2][:max_windows]
    if not windows:
        raise ValueError("The text is too short to score (fewer than 2 tokens).")
    total_nll, total_tokens = 0.0, 0
    for window in windows:
        logits = engine.prompt_logits(window)[:-1]
        targets = torch.tensor(window[1:], device=logits.device)
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        total_nll += nll.item()
        total_tokens += len(targets)
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(windows))
