"""TP=1 vs TP=2 offline throughput on this machine, same requests, runs alternated (TP1, TP2, TP1, ...), each
a separate `microscale bench throughput` process. On a CPU the two ranks split its cores (gloo all-reduces
between them), so expect little or no gain: this measures what tensor parallelism costs where it cannot help.

    .venv/bin/python benchmarks/tensor_parallel_cpu.py --out benchmarks/results/tp-cpu-qwen3-0.6b-dummy
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=str(REPO / "configs" / "models" / "Qwen3-0.6B"))
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", default=str(REPO / "models" / "tiny-llama-pycode"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for tp in (1, 2):
            path = out / f"tp{tp}-{repeat}.json"
            subprocess.run([
                sys.executable, "-m", "microscale", "bench", "throughput", "--model-path", args.model_path,
                "--load-format", args.load_format, "--tokenizer", args.tokenizer, "--dtype", args.dtype,
                "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts",
                str(args.num_prompts), "--max-batch-size", str(args.max_batch_size), "--tensor-parallel-size",
                str(tp), "--label", f"TP={tp}", "--json", str(path),
            ], check=True, stdout=subprocess.DEVNULL)
            run = json.loads(path.read_text())["runs"][0]
            results[tp].append(run["output_tokens_per_s"])
            print(f"TP={tp} run {repeat}: {run['output_tokens_per_s']:.1f} output tok/s", flush=True)
    medians = {tp: statistics.median(values) for tp, values in results.items()}
    summary = {"settings": vars(args), "output_tokens_per_s": results, "median": medians,
               "tp2_vs_tp1": medians[2] / medians[1]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| TP | output tok/s (median of {args.repeats}) | vs TP=1 |\n|---|---|---|")
    for tp in (1, 2):
        print(f"| {tp} | {medians[tp]:.1f} | {medians[tp] / medians[1]:.2f}x |")


if __name__ == "__main__":
    main()
