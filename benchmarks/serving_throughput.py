"""Serving through HTTP vs offline, same requests, same concurrency: what HTTP, SSE and the async engine cost.

A `microscale serve` subprocess on loopback gets the workload as streamed completions (token-id prompts, exact
output lengths) from `microscale.bench.serve_load`, at most --concurrency in flight; then, with the server
idle, the same requests run offline through `microscale.bench.throughput` with max_batch_size =
--concurrency. --repeats alternates the two (HTTP, offline, HTTP, ...) and reports each pair's ratio and
their median: on a shared machine one pair can be off by 15%. TTFT p50 at low load comes from a separate run
at concurrency 1.

    .venv/bin/python benchmarks/serving_throughput.py --num-prompts 64 --concurrency 16 --repeats 3

--server-cpus / --client-cpus pin the server process and this load generator (taskset / sched_setaffinity), to
see how much of the gap is the client and the server sharing a small machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from microscale.bench.config import load_config
from microscale.bench.datasets import load_dataset
from microscale.bench.serve_load import LoadSettings, run_load
from microscale.bench.throughput import run_throughput
from microscale.distributed.launch import free_port
from microscale.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def start_server(model: str, dtype: str, port: int, max_num_seqs: int, max_model_len: int = 1024,
                 cpus: str | None = None) -> subprocess.Popen:
    """`microscale serve MODEL` on loopback (pinned to `cpus` with taskset when given), once /health answers."""
    cmd = [sys.executable, "-m", "microscale", "serve", model, "--port", str(port), "--dtype", dtype,
           "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not come up")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_pid(front_pid: int) -> int:
    """The engine process the server front spawned (its other child is multiprocessing's resource tracker)."""
    with open(f"/proc/{front_pid}/task/{front_pid}/children") as f:
        for pid in f.read().split():
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    return int(pid)
    raise SystemExit("no engine process under the server")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llama-pycode"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dataset-path", default=str(REPO / "data" / "pycode-valid.txt"))
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--ttft-requests", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="alternating HTTP / offline pairs")
    p.add_argument("--server-cpus", default=None, help="taskset CPU list for the server, e.g. 0")
    p.add_argument("--client-cpus", default=None, help="CPU list for this load generator, e.g. 1")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    config = load_config(None, {
        "engine": {"model_path": args.model, "dtype": args.dtype, "max_batch_size": args.concurrency,
                   "max_model_len": args.max_model_len},
        "data": {"dataset_path": args.dataset_path, "input_len": args.input_len, "output_len": args.output_len,
                 "range_ratio": args.range_ratio, "num_prompts": args.num_prompts, "seed": args.seed},
    })
    d = config.data
    requests = load_dataset(d.dataset_path, Tokenizer.from_pretrained(args.model), num_prompts=d.num_prompts,
                            input_len=d.input_len, output_len=d.output_len, seed=d.seed,
                            range_ratio=d.range_ratio).requests
    port = free_port()
    server = start_server(args.model, args.dtype, port, args.concurrency, args.max_model_len, args.server_cpus)
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    pairs = []
    try:
        base = LoadSettings(f"http://127.0.0.1:{port}", args.model, 1, seed=args.seed)
        low_load = run_load(base, requests[: args.ttft_requests])
        pids = {"front": server.pid, "engine": engine_pid(server.pid)}
        for _ in range(args.repeats):
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            client_cpu = time.process_time()
            served = run_load(LoadSettings(base.base_url, args.model, args.concurrency, seed=args.seed), requests)
            client_cpu = time.process_time() - client_cpu
            server_cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            if args.client_cpus:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            offline = run_throughput(config, requests)
            if args.client_cpus:
                os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
            assert served["output_tokens"] == offline["output_tokens"], "the server returned other output lengths"
            pair = {"http_tok_s": served["output_tokens_per_s"], "offline_tok_s": offline["output_tokens_per_s"],
                    "http_vs_offline": served["output_tokens_per_s"] / offline["output_tokens_per_s"],
                    "ttft_p50_at_concurrency_ms": served["ttft_ms"]["p50"], "client_cpu_s": client_cpu,
                    "front_cpu_s": server_cpu["front"], "engine_cpu_s": server_cpu["engine"],
                    "http_s": served["duration_s"], "offline_s": offline["duration_s"]}
            pairs.append(pair)
            print(f"HTTP {pair['http_tok_s']:.1f} tok/s, offline {pair['offline_tok_s']:.1f} tok/s: "
                  f"{pair['http_vs_offline']:.1%} of offline at concurrency {args.concurrency}; TTFT p50 "
                  f"{pair['ttft_p50_at_concurrency_ms']:.1f} ms loaded; CPU seconds in {pair['http_s']:.1f} s: engine "
                  f"{pair['engine_cpu_s']:.1f}, server front {pair['front_cpu_s']:.1f}, client {client_cpu:.1f}",
                  flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    record = {
        "model": args.model, "dtype": args.dtype, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "workload": config.to_dict()["data"], "output_tokens": offline["output_tokens"],
        "http_vs_offline_median": statistics.median(p["http_vs_offline"] for p in pairs), "pairs": pairs,
        "ttft_p50_low_load_ms": low_load["ttft_ms"]["p50"],
        "server_cpus": args.server_cpus, "client_cpus": args.client_cpus, "cpus": os.cpu_count(),
    }
    print(f"median over {len(pairs)} pairs: HTTP at {record['http_vs_offline_median']:.1%} of offline; TTFT p50 "
          f"{record['ttft_p50_low_load_ms']:.1f} ms at low load")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
