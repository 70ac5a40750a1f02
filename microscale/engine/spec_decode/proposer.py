"""What every proposer of draft tokens gives the verifier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from microscale.engine.sequence import Sequence


@dataclass
class Proposals:
    """Draft tokens for a batch of sequences: up to k per sequence (none where there is nothing to propose)."""

    token_ids: list[list[int]]
    # The draft's distributions the tokens were sampled from, [len(token_ids), k, vocab], processed with each
    # request's sampling parameters as the target's are (rows and positions past a sequence's drafts unused).
    # None: each draft token was chosen deterministically from the context (a point mass on it), as n-gram does.
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    """Proposes the tokens that may follow each sequence (its prompt and output so far), at most limits[i] for
    sequence i (what it may still emit). A draft model proposes from its own KV cache and returns its
    probabilities; an EAGLE-style head would also take the target's hidden states of the last step (a further
    argument then)."""

    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposals: ...

    def release(self, seq: Sequence) -> None:
        """`seq` is finished: drop what is kept for it."""
