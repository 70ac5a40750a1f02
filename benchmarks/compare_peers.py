"""microscale vs its peers on one workload, in one run: one table with ratios to transformers, and a PNG.

Each backend runs as its own `microscale bench throughput` process (so one engine's memory and threads never
touch another's) with the same data settings; vLLM runs when it is importable or --vllm-python is given.
A backend may carry a quantization scheme: `microscale:fp8` runs microscale with `--quant fp8`.

    .venv/bin/python benchmarks/compare_peers.py --model-path models/tiny-llama-pycode --dtype float32 \\
        --input-len 256 --output-len 128 --num-prompts 64 --out benchmarks/results/peers-tiny-llama
    .venv/bin/python benchmarks/compare_peers.py --model-path configs/models/Qwen3-0.6B --load-format dummy \\
        --tokenizer models/tiny-llama-pycode --dtype bfloat16 --input-len 256 --output-len 128 --num-prompts 64 \\
        --out benchmarks/results/peers-qwen3-0.6b-dummy

Any other `bench throughput` flag (e.g. --config bench.yaml, --max-batch-size 32) is passed through.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from microscale.bench.plot import plot_results
from microscale.bench.report import load_results

BASELINE = "transformers"


def run_backend(spec: str, passthrough: list[str], out: Path, vllm_python: str | None) -> dict | None:
    backend, _, quant = spec.partition(":")
    result = out / f"{spec.replace(':', '-')}.json"
    cmd = [sys.executable, "-m", "microscale", "bench", "throughput", *passthrough, "--backend", backend,
           "--label", spec, "--json", str(result)]
    if quant:
        cmd += ["--quant", quant]
    if backend == "vllm" and vllm_python:
        cmd += ["--vllm-python", vllm_python]
    print(f"... {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(f"!!! {spec} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        return None
    return load_results(result)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="microscale,transformers,vllm",
                   help="comma-separated: microscale[:quant], transformers, vllm (skipped if it cannot run)")
    p.add_argument("--vllm-python", default=None, help="python of a virtualenv with vLLM")
    p.add_argument("--out", required=True, help="folder (or prefix) for the per-backend JSON, summary and PNG")
    args, passthrough = p.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [r for spec in args.backends.split(",") if (r := run_backend(spec.strip(), passthrough, out,
                                                                            args.vllm_python))]
    if not records:
        return 1
    base = next((r["runs"][0]["output_tokens_per_s"] for r in records if r["label"] == BASELINE), None)
    lines = [f"| backend | output tok/s | req/s | E2E p50 ms | vs {BASELINE} |", "|---|---|---|---|---|"]
    for r in records:
        run = r["runs"][0]
        ratio = f"{run['output_tokens_per_s'] / base:.2f}x" if base else "-"
        e2e = f"{run['e2e_ms']['p50']:.0f}" if run["e2e_ms"] else "-"
        lines.append(f"| {r['label']} | {run['output_tokens_per_s']:.1f} | {run['requests_per_s']:.2f} | {e2e} "
                     f"| {ratio} |")
    env, data = records[0]["environment"], records[0]["settings"]["data"]
    header = (f"{records[0]['settings']['engine']['model_path']}, dtype {records[0]['settings']['engine']['dtype']}; "
              f"{data['dataset_path']} in {data['input_len']} / out {data['output_len']}, {data['num_prompts']} "
              f"prompts; {env['gpu'] or env['cpu']} ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads)")
    table = "\n".join([header, "", *lines])
    print(table)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {out / 'summary.md'} and {plot_results(records, out / 'peers.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
