"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of a sequence's last n tokens.

Each sequence's tokens are kept as an int32 array, extended by its new tokens each step (the tokens of a sequence
are only ever appended), so a lookup is a C-speed `bytes.rfind` over the array per n tried, not a Python loop
over the context (benchmarks/ngram_proposer.py measures it).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence as TokenIds

from microscale.engine.sequence import Sequence
from microscale.engine.spec_decode.proposer import Proposals

_ITEM = array("i").itemsize


def find_ngram_continuation(tokens: array, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens of `tokens`, for the
    largest n in [min_n, max_n] that occurs; fewer when that occurrence is near the end, none without one."""
    length = len(tokens)
    haystack = tokens.tobytes()
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = haystack[(length - n) * _ITEM :]
        # An occurrence must be followed by a token: it starts at most at length - n - 1.
        end = (length - 1) * _ITEM
        while (at := haystack.rfind(pattern, 0, end)) >= 0:
            if at % _ITEM == 0:  # a byte match across token boundaries is no token match
                start = at // _ITEM + n
                return tokens[start : start + k].tolist()
            end = at + len(pattern) - 1
    return []


class NgramProposer:
    """Prompt-lookup proposals (vLLM's method "ngram"): n from max_n down to min_n, up to k tokens."""

    def __init__(self, min_n: int, max_n: int, k: int) -> None:
        if not 1 <= min_n <= max_n or k < 1:
            raise ValueError(f"NgramProposer needs 1 <= min_n <= max_n and k >= 1, got {min_n}, {max_n}, {k}.")
        self.min_n, self.max_n, self.k = min_n, max_n, k
        # A sequence's tokens as an array, dropped when it finishes.
        self._arrays: dict[Sequence, array] = {}

    def propose(self, seqs: list[Sequence], limits: list[int]) -> Proposals:
        return Proposals([find_ngram_continuation(self._tokens(seq), self.min_n, self.max_n, min(self.k, limit))
                          for seq, limit in zip(seqs, limits, strict=True)])

    def release(self, seq: Sequence) -> None:
        self._arrays.pop(seq, None)

    def propose_for(self, token_ids: TokenIds[int]) -> list[int]:
        """The proposal for one token list, with nothing kept (a full conversion: for tests and one-offs)."""
        return find_ngram_continuation(array("i", token_ids), self.min_n, self.max_n, self.k)

    def _tokens(self, seq: Sequence) -> array:
        tokens = self._arrays.get(seq)
        if tokens is None or len(tokens) > seq.num_tokens:
            tokens = self._arrays[seq] = array("i")
        tokens.extend(seq.token_ids[len(tokens) :])
        return tokens
