"""`microscale bench serve` vs NVIDIA's aiperf on the same load against the same microscale server.

Both send streamed /v1/completions with the same concurrency, request count, input length and exact output
length (ignore_eos), as text prompts (aiperf's are synthetic text; ours are slices of --dataset-path: random
token ids made first tokens measurably faster on this model than any text, so they are not the same load);
the script prints both tools' output tokens/s and mean TTFT and their ratio (they should agree within 10%).
aiperf lives in its own virtualenv (see the README: `pip install -c constraints aiperf`).

    .venv/bin/python benchmarks/crosscheck_aiperf.py --aiperf /work/peers/aiperf/bin/aiperf --json out.json
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from serving_throughput import start_server

from microscale.bench.datasets import load_dataset
from microscale.bench.serve_load import LoadSettings, run_load
from microscale.distributed.launch import free_port
from microscale.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def bench_serve(args: argparse.Namespace, url: str, requests: list) -> dict:
    run = run_load(LoadSettings(url, args.model, args.concurrency, seed=args.seed, prompt_format="text"),
                   requests)
    return {"output_tokens_per_s": run["output_tokens_per_s"], "ttft_mean_ms": run["ttft_ms"]["mean"],
            "ttft_p50_ms": run["ttft_ms"]["p50"]}


def run_aiperf(args: argparse.Namespace, url: str, out: Path) -> dict:
    cmd = [args.aiperf, "profile", "--model", args.model, "--url", url, "--endpoint-type", "completions",
           "--streaming", "--concurrency", str(args.concurrency), "--request-count", str(args.num_prompts),
           "--warmup-request-count", "1", "--isl", str(args.input_len), "--prompt-input-tokens-stddev", "0",
           "--osl", str(args.output_len), "--osl-stddev", "0", "--extra-inputs", "ignore_eos:true",
           "--extra-inputs", f"min_tokens:{args.output_len}", "--use-server-token-count", "--tokenizer",
           str(Path(args.model).resolve()), "--random-seed", str(args.seed), "--artifact-dir", str(out),
           "--ui-type", "none", "--no-gpu-telemetry", "--no-server-metrics"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "profile_export_aiperf.json").read_text())
    return {"output_tokens_per_s": report["output_token_throughput"]["avg"],
            "ttft_mean_ms": report["time_to_first_token"]["avg"],
            "ttft_p50_ms": report["time_to_first_token"]["p50"]}


def server_ttft(url: str) -> tuple[float, float]:
    """The server's own TTFT histogram (sum in seconds, count): the referee between the two clients."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "microscale:time_to_first_token_seconds":
            values = {s.name.rsplit("_", 1)[-1]: s.value for s in family.samples}
            return values["sum"], values["count"]
    raise RuntimeError("the server exports no TTFT histogram")


def measured(tool_runs: list, url: str, run) -> None:
    """Run one tool's load and append its figures with the server-side mean TTFT of that load."""
    sum0, count0 = server_ttft(url)
    figures = run()
    sum1, count1 = server_ttft(url)
    figures["server_side_ttft_mean_ms"] = 1000 * (sum1 - sum0) / (count1 - count0)
    tool_runs.append(figures)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aiperf", required=True, help="the aiperf executable (its own virtualenv)")
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llama-pycode"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset-path", default=str(REPO / "data" / "pycode-valid.txt"), help="text our prompts come from")
    p.add_argument("--repeats", type=int, default=3, help="runs of each tool, alternating")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    requests = load_dataset(args.dataset_path, Tokenizer.from_pretrained(args.model), num_prompts=args.num_prompts,
                            input_len=args.input_len, output_len=args.output_len, seed=args.seed).requests
    server = start_server(args.model, args.dtype, port, args.concurrency)
    ours, theirs = [], []
    try:  # alternate the tools, so that a slow spell of this shared machine hits both
        for _ in range(args.repeats):
            measured(ours, url, lambda: bench_serve(args, url, requests))
            with tempfile.TemporaryDirectory(prefix="aiperf-") as tmp:
                measured(theirs, url, lambda: run_aiperf(args, url, Path(tmp)))  # noqa: B023 (called at once)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    record = {"settings": vars(args), "microscale_bench": ours, "aiperf": theirs}
    for key in ("output_tokens_per_s", "ttft_mean_ms", "server_side_ttft_mean_ms"):
        a, b = (statistics.fmean(run[key] for run in runs) for runs in (ours, theirs))
        record[f"{key}_mean"] = {"microscale_bench": a, "aiperf": b}
        record[f"{key}_ratio"] = a / b
        print(f"{key} (mean of {args.repeats}): microscale bench serve {a:.2f}, aiperf {b:.2f}, ratio {a / b:.3f} "
              f"({'within' if abs(a / b - 1) <= 0.10 else 'OUTSIDE'} 10%)")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
