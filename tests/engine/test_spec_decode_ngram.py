"""NgramProposer on hand-made token lists: the longest n first, the latest occurrence, truncation near the end,
no match; and the incremental per-sequence arrays agree with a fresh lookup as a sequence grows."""

from __future__ import annotations

import random

import pytest

from microscale.engine.sequence import Request, Sequence
from microscale.engine.spec_decode.ngram import NgramProposer
from microscale.sampling_params import SamplingParams


def test_latest_occurrence_wins():
    # "1 2" occurs twice before the end; the later one was followed by 7 8.
    assert NgramProposer(2, 2, 2).propose_for([1, 2, 3, 4, 1, 2, 7, 8, 9, 1, 2]) == [7, 8]


def test_longest_n_wins_over_a_later_shorter_match():
    tokens = [5, 1, 2, 30, 31, 9, 2, 40, 41, 5, 1, 2]
    assert NgramProposer(1, 3, 2).propose_for(tokens) == [30, 31]  # "5 1 2" at the start
    assert NgramProposer(1, 1, 2).propose_for(tokens) == [40, 41]  # "2" alone: its latest occurrence


def test_falls_back_to_shorter_n():
    assert NgramProposer(1, 4, 3).propose_for([8, 3, 4, 5, 6, 9, 4]) == [5, 6, 9]


def test_truncated_near_the_end():
    assert NgramProposer(2, 2, 5).propose_for([1, 2, 3, 4, 1, 2]) == [3, 4, 1, 2]
    # A repeating run: the latest earlier "7 7" is followed by one token only.
    assert NgramProposer(2, 2, 3).propose_for([7, 7, 7, 7]) == [7]


def test_no_match():
    assert NgramProposer(1, 3, 4).propose_for([1, 2, 3, 4, 5]) == []
    assert NgramProposer(2, 3, 4).propose_for([1, 2, 1]) == []  # n = 1 would match, but min_n is 2
    assert NgramProposer(1, 1, 4).propose_for([1]) == []
    assert NgramProposer(1, 2, 4).propose_for([]) == []


def test_byte_matches_across_token_boundaries_do_not_count():
    # As int32 bytes, 256 = 00 01 00 00 and 1 = 01 00 00 00: [256, 0] holds the bytes of [1] shifted by one,
    # a byte-level match of "1" that is no token match.
    assert NgramProposer(1, 1, 2).propose_for([256, 0, 0, 5, 1]) == []
    assert NgramProposer(1, 1, 2).propose_for([256, 0, 1, 6, 1]) == [6, 1]


def test_large_token_ids():
    big = 2**31 - 1
    assert NgramProposer(1, 2, 2).propose_for([big, 0, big - 1, big]) == [0, big - 1]


def _sequence(prompt: list[int]) -> Sequence:
    return Sequence(Request("r", None, prompt, SamplingParams()), 0, None)


def test_batch_proposals_follow_each_growing_sequence():
    rng = random.Random(0)
    proposer = NgramProposer(1, 3, 4)
    seqs = [_sequence([rng.randrange(6) for _ in range(20)]) for _ in range(3)]
    for _ in range(30):
        limits = [rng.randrange(1, 6) for _ in seqs]
        proposals = proposer.propose(seqs, limits)
        assert proposals.probs is None
        assert proposals.token_ids == [proposer.propose_for(seq.token_ids)[:limit]
                                       for seq, limit in zip(seqs, limits)]
        for seq in seqs:
            seq.token_ids += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
    proposer.release(seqs[0])
    assert list(proposer._arrays) == seqs[1:]


@pytest.mark.parametrize(("min_n", "max_n", "k"), [(0, 2, 1), (3, 2, 1), (1, 2, 0)])
def test_bad_bounds(min_n, max_n, k):
    with pytest.raises(ValueError, match="NgramProposer needs"):
        NgramProposer(min_n, max_n, k)
