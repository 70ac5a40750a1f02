"""Vectorised sampling over a batch of requests, each with its own parameters.

The batch is built from plain rows (parameters, tokens so far, generator), once per step; per-request
parameters travel as tensors and a filter runs only when some row needs it. Random draws use the exponential
trick (argmax of p / Exp(1) samples from p), so a request with a seed draws its noise from its own generator
and gets the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from microscale.engine.structured import RowMask, unpack_bitmask
from microscale.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What sampling needs of one sequence: its parameters, its tokens so far (for penalties and min_tokens)
    and, when seeded, its own generator."""

    params: SamplingParams
    token_ids: list[int]  # the prompt, then the output so far
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    allowed: RowMask | None = None  # structured outputs: the tokens its grammar allows next (filled off-thread)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def after(self, tokens: list[int]) -> SamplingRow:
        """The row once `tokens` are output too (a draft position: the drafts before it count as output)."""
        if not tokens:
            return self
        return SamplingRow(self.params, self.token_ids + tokens, self.num_prompt_tokens, self.generator, self.allowed)


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
    # Structured outputs: (rows, [len(rows), vocab] bool of the tokens each row's grammar allows next).
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, rows: list[SamplingRow], eos_ids: list[int], vocab_size: int, device: torch.device) -> SamplingBatch:
        params = [r.params for r in rows]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        temps = [p.temperature for p in params]
        any_top_k = any(p.top_k > 0 for p in params)
        any_top_p = any(p.top_p < 1 for p in params)
        any_min_p = any(p.min_p > 0 for p in params)
        seeded = {i: r.generator for i, r in enumerate(rows) if r.generator is not None and r.params.temperature > 0}
        penalties = None
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            penalties = Penalties(
                output_ids=_pad([r.token_ids[r.num_prompt_tokens :] for r in rows], vocab_size, device),
                prompt_ids=_pad([r.token_ids[: r.num_prompt_tokens] for r in rows], vocab_size, device),
                repetition=column([p.repetition_penalty for p in params], torch.float32),
                presence=column([p.presence_penalty for p in params], torch.float32),
                frequency=column([p.frequency_penalty for p in params], torch.float32),
            )
        blocked_rows, ids = [], []
        for i, r in enumerate(rows):
            # A grammar decides where its output ends: blocking its end tokens would leave it nothing to sample.
            if r.num_output_tokens < r.params.min_tokens and r.allowed is None:
                banned = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(eos_ids))
                blocked_rows += [i] * len(banned)
                ids += sorted(banned)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        constrained = [i for i, r in enumerate(rows) if r.allowed is not None]
        allowed = None
        if constrained:  # waits here for what is left of the masks' fill
            bitmask = torch.stack([rows[i].allowed.bits() for i in constrained])
            allowed = (torch.tensor(constrained, device=device), unpack_bitmask(bitmask, vocab_size, device))
        return cls(
            temperature=column(temps, torch.float32),
            all_greedy=all(t == 0 for t in temps),
            top_k=column([p.top_k for p in params], torch.int64) if any_top_k else None,
            top_p=column([p.top_p for p in params], torch.float32) if any_top_p else None,
            min_p=column([p.min_p for p in params], torch.float32) if any_min_p else None,
            seeded=seeded,
            penalties=penalties,
            blocked=(blocked_rows, ids) if blocked_rows else None,
            num_logprobs=max(asked) if asked else None,
            allowed=allowed,
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

    def to_host(self, rows: list[int]) -> SampledTokens:
        """The step's one device -> host copy; `rows`: the step's rows these samples belong to."""
        if self.chosen_logprobs is None:
            return SampledTokens(rows, self.token_ids.tolist())
        return SampledTokens(rows, self.token_ids.tolist(), self.chosen_logprobs.tolist(), self.chosen_ranks.tolist(),
                             self.top_ids.tolist(), self.top_logprobs.tolist())


@dataclass
class SampledTokens:
    """A step's samples on the host: one token for each of `rows` (indices into the step's sampling rows), and
    the rows whose own parameters made sampling fail, with the error."""

    rows: list[int]
    token_ids: list[int]
    # When logprobs were asked for: the chosen token's logprob and rank, and the top-N ids and logprobs.
    chosen_logprobs: list[float] | None = None
    chosen_ranks: list[int] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    failed: dict[int, Exception] = field(default_factory=dict)

    def logprobs(self, i: int) -> TokenLogprobs | None:
        """The logprobs of sample i, if they were asked for."""
        if self.chosen_logprobs is None:
            return None
        return self.chosen_logprobs[i], self.chosen_ranks[i], self.top_ids[i], self.top_logprobs[i]


# A token's logprob, its rank, and the top-N ids and logprobs at its position (the model's raw distribution).
TokenLogprobs = tuple[float, int, list[int], list[float]]


@dataclass
class VerifiedTokens:
    """A sequence's tokens of one step: with drafts (num_drafts > 0), the accepted ones and one more; each token's
    logprobs when its request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    num_drafts: int = 0


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


def constrain_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """What every row, greedy or not, picks from: the logits after penalties, min_tokens' blocked tokens and a
    grammar's mask (float32, a new tensor)."""
    logits = logits.float()
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    if batch.blocked is not None:
        rows, ids = (torch.tensor(x, device=logits.device) for x in batch.blocked)
        logits = logits.index_put((rows, ids), torch.tensor(float("-inf"), device=logits.device))  # not in place
    if batch.allowed is not None:
        rows, mask = batch.allowed
        blocked = torch.tensor(float("-inf"), device=logits.device)
        if len(rows) == len(logits):  # every row constrained (rows are 0..S-1): no gather and scatter back
            logits = torch.where(mask, logits, blocked)
        else:
            logits = logits.index_copy(0, rows, torch.where(mask, logits[rows], blocked))
    return logits


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution a random row samples from: constrained `logits` over its temperature, then min_p, top-k
    and top-p. A greedy row's temperature counts as 1 (its argmax is what it takes)."""
    temp = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    logits = logits / temp[:, None]
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        floor = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if batch.top_k is not None or batch.top_p is not None:
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    return logits.softmax(dim=-1)


def sample_from(probs: torch.Tensor, seeded: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` (which need not sum to 1). The exponential trick: argmax of p / Exp(1)
    samples from p, so a seeded row draws its noise from its own generator, whatever else shares the batch."""
    noise = torch.empty_like(probs).exponential_()
    for row, generator in seeded.items():
        # Drawn on the CPU so that a seed gives the same tokens on every device.
        noise[row] = torch.empty(probs.shape[1]).exponential_(generator=generator).to(noise.device)
    return (probs / noise).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        # Logprobs are those of the model's distribution, before penalties and temperature (as vLLM).
        raw_logprobs = logits.log_softmax(dim=-1) if batch.num_logprobs is not None else None
        logits = constrain_logits(logits, batch)
        token_ids = logits.argmax(dim=-1)
        if not batch.all_greedy:
            sampled = sample_from(sampling_probs(logits, batch), batch.seeded)
            token_ids = torch.where(batch.temperature == 0, token_ids, sampled)
        out = SamplerOutput(token_ids)
        if raw_logprobs is not None:
            out.chosen_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
            out.chosen_ranks = (raw_logprobs > out.chosen_logprobs[:, None]).sum(dim=-1) + 1
            out.top_logprobs, out.top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        return out


def sample(
    sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], eos_ids: list[int], vocab_size: int
) -> SampledTokens:
    """One token per row. Should that raise, each row is tried alone: those that fail alone are a bad request's
    (say, a parameter its sampling tensor cannot hold), so they are reported failed and the others sampled again.
    Only when no row fails alone is the error the engine's own, and raised."""

    def run(keep: list[int]) -> SamplerOutput:
        batch = SamplingBatch.build([rows[i] for i in keep], eos_ids, vocab_size, logits.device)
        return sampler(logits[keep] if len(keep) < len(rows) else logits, batch)

    def fails_alone(row: int) -> bool:
        try:
            run([row])
        except Exception:
            return True
        return False

    everything = list(range(len(rows)))
    if not rows:  # a step of prefill chunks that all end before their prompt does
        return SampledTokens([], [])
    try:
        return run(everything).to_host(everything)
    except Exception as e:
        failed = {row: e for row in everything if fails_alone(row)}
        if not failed:
            raise
    keep = [row for row in everything if row not in failed]
    tokens = run(keep).to_host(keep) if keep else SampledTokens([], [])
    tokens.failed = failed
    return tokens
