"""Speculative decoding on CPU: decode tokens/s with speculation off, with n-gram drafts and with a draft model,
at batch 1 (one held-out code prompt at a time, the interactive case) and at --large-batch (that many requests at
once, where disable_by_batch_size should turn speculation off), with the acceptance rate and tokens per
verification. Runs alternate (off, ngram, draft, off, ...) and the best of --repeats is kept: the machine is shared.

    .venv/bin/python benchmarks/spec_decode.py --model models/tiny-llama-pycode \
        --draft-model models/tiny-llama-pycode-draft --prompts 16 --max-tokens 128

Greedy, float32, ignore_eos (every run decodes the same number of tokens); outputs are checked equal to "off".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from microscale import LLM, SamplingParams


def decode_rate(llm: LLM, prompts: list[str], params: SamplingParams, batch: int) -> tuple[float, list]:
    """Decode tokens/s over the prompts in batches of `batch` (first tokens excluded: they cost a prefill)."""
    outputs, decode_s, decoded = [], 0.0, 0
    for start in range(0, len(prompts), batch):
        began = time.perf_counter()
        done = llm.generate(prompts[start : start + batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - began
        first = max(o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in done)
        decode_s += elapsed - first
        decoded += sum(len(o.outputs[0].token_ids) - 1 for o in done)
        outputs += [o.outputs[0].token_ids for o in done]
    return decoded / decode_s, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny-llama-pycode")
    parser.add_argument("--data", default="data/pycode-valid.txt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts decoded one at a time (batch 1)")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens of n-gram")
    parser.add_argument("--lookup-min", type=int, default=2)
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--draft-model", default="models/tiny-llama-pycode-draft", help="'' to leave it out")
    parser.add_argument("--draft-k", type=int, default=4, help="num_speculative_tokens of the draft model")
    parser.add_argument("--disable-by-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = Path(args.data).read_text()
    count = max(args.prompts, args.large_batch)
    stride = len(text) // count
    prompts = [text[i * stride : i * stride + args.prompt_chars] for i in range(count)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    configs = {"off": None,
               "ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": args.lookup_min,
                         "prompt_lookup_max": args.lookup_max, "disable_by_batch_size": args.disable_by_batch_size}}
    if args.draft_model:
        configs["draft"] = {"method": "draft", "model": args.draft_model, "num_speculative_tokens": args.draft_k,
                            "disable_by_batch_size": args.disable_by_batch_size}
    engines = {name: LLM(args.model, dtype="float32", speculative_config=spec) for name, spec in configs.items()}
    results = {}
    for batch, subset in ((1, prompts[: args.prompts]), (args.large_batch, prompts[: args.large_batch])):
        best = {name: 0.0 for name in engines}
        outputs = {}
        before = {name: dict(llm.engine.get_stats()) for name, llm in engines.items()}
        for _ in range(args.repeats):
            for name, llm in engines.items():
                rate, outputs[name] = decode_rate(llm, subset, params, batch)
                best[name] = max(best[name], rate)
        row = {"off_tok_s": round(best["off"], 1)}
        for name in engines:
            if name == "off":
                continue
            stats = engines[name].engine.get_stats()
            drafts, proposed, accepted = (stats[k] - before[name][k] for k in (
                "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"))
            row[name] = {
                "tok_s": round(best[name], 1), "speedup": round(best[name] / best["off"], 2),
                "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
                "tokens_per_verification": round(1 + accepted / drafts, 2) if drafts else None,
                "outputs_equal": outputs["off"] == outputs[name],
            }
        results[f"batch {batch}"] = row
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
    results["settings"] = {**vars(args), "load_average": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
