"""Decode tokens/s of an LLM, shared by the benchmarks: the same prompts generated to 1 and to N tokens, so
prefill and the first token cancel out and the difference is N - 1 decode steps of every sequence."""

from __future__ import annotations

import time

from microscale import LLM, SamplingParams


def decode_tokens_per_s(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    requests = [{"prompt_token_ids": p} for p in prompts]
    elapsed = {}
    for n in (1, new_tokens):
        params = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        elapsed[n] = time.perf_counter() - start
    return len(prompts) * (new_tokens - 1) / (elapsed[new_tokens] - elapsed[1])
