"""Vectorised sampling over a batch of requests, each with its own parameters.

Per-request parameters travel as tensors; a filter runs only when some row needs it. Random draws use
the exponential trick (argmax of p / Exp(1) samples from p), so a request with a seed draws its noise
from its own generator and gets the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from microscale.engine.sequence import Sequence


@dataclass
class Penalties:
    output_ids: torch.Tensor  # [S, max_out] padded with vocab_size
    prompt_ids: torch.Tensor  # [S, max_prompt] padded with vocab_size
    repetition: torch.Tensor  # [S]
    presence: torch.Tensor
    frequency: torch.Tensor


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [S]; 0 means greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [S] int64, 0 = off
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    seeded: dict[int, torch.Generator]  # row -> the request's generator
    penalties: Penalties | None
    blocked: tuple[list[int], list[int]] | None  # (rows, token ids) that may not be sampled yet (min_tokens)
    num_logprobs: int | None  # the largest top-N any row asked for; None if none asked

    @classmethod
    def build(cls, seqs: list[Sequence], eos_ids: list[int], vocab_size: int, device: torch.device) -> SamplingBatch:
        params = [s.params for s in seqs]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        temps = [p.temperature for p in params]
        any_top_k = any(p.top_k > 0 for p in params)
        any_top_p = any(p.top_p < 1 for p in params)
        any_min_p = any(p.min_p > 0 for p in params)
        seeded = {i: s.generator for i, s in enumerate(seqs) if s.generator is not None and s.params.temperature > 0}
        penalties = None
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            penalties = Penalties(
                output_ids=_pad([s.output_token_ids for s in seqs], vocab_size, device),
                prompt_ids=_pad([s.token_ids[: s.num_prompt_tokens] for s in seqs], vocab_size, device),
                repetition=column([p.repetition_penalty for p in params], torch.float32),
                presence=column([p.presence_penalty for p in params], torch.float32),
                frequency=column([p.frequency_penalty for p in params], torch.float32),
            )
        rows, ids = [], []
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                banned = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(eos_ids))
                rows += [i] * len(banned)
                ids += sorted(banned)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=column(temps, torch.float32),
            all_greedy=all(t == 0 for t in temps),
            top_k=column([p.top_k for p in params], torch.int64) if any_top_k else None,
            top_p=column([p.top_p for p in params], torch.float32) if any_top_p else None,
            min_p=column([p.min_p for p in params], torch.float32) if any_min_p else None,
            seeded=seeded,
            penalties=penalties,
            blocked=(rows, ids) if rows else None,
            num_logprobs=max(asked) if asked else None,
        )


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S]
    # When logprobs were asked for: the chosen token's logprob and rank, and the top-N ids and logprobs.
    chosen_logprobs: torch.Tensor | None = None
    chosen_ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def apply_penalties(logits: torch.Tensor, pen: Penalties) -> torch.Tensor:
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab + 1, device=logits.device)
    counts.scatter_add_(1, pen.output_ids, torch.ones_like(pen.output_ids, dtype=counts.dtype))
    counts = counts[:, :vocab]
    in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
    in_prompt.scatter_(1, pen.prompt_ids, True)
    seen = in_prompt[:, :vocab] | (counts > 0)
    rep = pen.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - pen.frequency[:, None] * counts - pen.presence[:, None] * (counts > 0)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        # Logprobs are those of the model's distribution, before penalties and temperature (as vLLM).
        raw_logprobs = logits.log_softmax(dim=-1) if batch.num_logprobs is not None else None
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        if batch.blocked is not None:
            rows, ids = (torch.tensor(x, device=logits.device) for x in batch.blocked)
            logits = logits.index_put((rows, ids), torch.tensor(float("-inf"), device=logits.device))  # not in place
        token_ids = logits.argmax(dim=-1)
        if not batch.all_greedy:
            token_ids = torch.where(batch.temperature == 0, token_ids, self._random(logits, batch))
        out = SamplerOutput(token_ids)
        if raw_logprobs is not None:
            out.chosen_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
            out.chosen_ranks = (raw_logprobs > out.chosen_logprobs[:, None]).sum(dim=-1) + 1
            out.top_logprobs, out.top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        return out

    @staticmethod
    def _random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temp = torch.where(batch.temperature > 0, batch.temperature, 1.0)
        logits = logits / temp[:, None]
        if batch.min_p is not None:
            probs = logits.softmax(dim=-1)
            floor = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < floor, float("-inf"))
        if batch.top_k is not None or batch.top_p is not None:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, generator in batch.seeded.items():
            # Drawn on the CPU so that a seed gives the same tokens on every device.
            noise[row] = torch.empty(probs.shape[1]).exponential_(generator=generator).to(noise.device)
        return (probs / noise).argmax(dim=-1)
