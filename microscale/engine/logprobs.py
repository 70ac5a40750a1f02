"""Logprob entries in the API's shape: the chosen token's logprob and rank, then the top-N (a chosen token that
is among them keeps its own entry). Sampled tokens and scored prompt tokens get the same shape."""

from __future__ import annotations

from collections.abc import Callable

import torch

from microscale.outputs import Logprob, SampleLogprobs


def logprob_entry(
    decode: Callable[[list[int]], str], token: int, logprob: float, rank: int, top_ids: list[int],
    top_logprobs: list[float],
) -> dict[int, Logprob]:
    entry = {token: Logprob(logprob, rank, decode([token]))}
    for top_rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs), 1):
        entry.setdefault(tid, Logprob(lp, top_rank, decode([tid])))
    return entry


def prompt_logprobs(
    logits: torch.Tensor, token_ids: list[int], top_n: int, decode: Callable[[list[int]], str]
) -> SampleLogprobs:
    """Per prompt token after the first (which has none), from the logits at every position (row i predicts
    token i + 1): its logprob, rank and the top_n."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(token_ids[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0]
    ranks = ((logprobs > chosen[:, None]).sum(dim=1) + 1).tolist()
    top, top_ids = logprobs.topk(max(top_n, 1), dim=-1)
    chosen, top, top_ids = chosen.tolist(), top[:, :top_n].tolist(), top_ids[:, :top_n].tolist()
    return [logprob_entry(decode, token, chosen[row], ranks[row], top_ids[row], top[row])
            for row, token in enumerate(token_ids[1:])]
