"""Cost of one n-gram proposal (prompt lookup) per sequence per step near a given context length: the proposer's
incremental path (the sequence's int32 array extended by its new token, then `bytes.rfind` per n tried) against
a fresh conversion of the whole token list each call. Two contexts: random tokens (no match, so every n from
max_n down to min_n scans the whole context: the worst case) and a repeated snippet (a match near the end).

    .venv/bin/python benchmarks/ngram_proposer.py --context 4096 --min-n 2 --max-n 5 --k 4

Each timed run grows a sequence from context - steps to context tokens, one token per call (as decoding does).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from microscale.engine.sequence import Request, Sequence
from microscale.engine.spec_decode.ngram import NgramProposer
from microscale.sampling_params import SamplingParams


def incremental_us(tokens: list[int], proposer: NgramProposer, steps: int) -> float:
    seq = Sequence(Request("r", None, tokens[: len(tokens) - steps], SamplingParams()), 0, None)
    proposer.propose([seq], [proposer.k])  # the sequence's array is built once, at its first step
    start = time.perf_counter()
    for token in tokens[len(tokens) - steps :]:
        seq.token_ids.append(token)
        proposer.propose([seq], [proposer.k])
    return (time.perf_counter() - start) / steps * 1e6


def fresh_us(tokens: list[int], proposer: NgramProposer, steps: int) -> float:
    start = time.perf_counter()
    for end in range(len(tokens) - steps + 1, len(tokens) + 1):
        proposer.propose_for(tokens[:end])
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--min-n", type=int, default=2)
    p.add_argument("--max-n", type=int, default=5)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rng = random.Random(0)
    snippet = [rng.randrange(32000) for _ in range(50)]
    contexts = {
        "random (no match)": [rng.randrange(32000) for _ in range(args.context)],
        "repeated snippet": (snippet * (args.context // len(snippet) + 1))[: args.context],
    }
    print(f"context {args.context} tokens, n {args.min_n}..{args.max_n}, k {args.k}: "
          f"microseconds per call (median of {args.repeats} runs)")
    for name, tokens in contexts.items():
        proposer = NgramProposer(args.min_n, args.max_n, args.k)
        kept = statistics.median(incremental_us(tokens, proposer, args.steps) for _ in range(args.repeats))
        fresh = statistics.median(fresh_us(tokens, proposer, args.steps) for _ in range(args.repeats))
        print(f"  {name:18s}  incremental {kept:7.1f}   fresh conversion {fresh:7.1f}")


if __name__ == "__main__":
    main()
