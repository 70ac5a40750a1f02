"""Serving through HTTP vs offline `LLM.generate`, same requests, same concurrency.

A `microscale serve` subprocess on loopback gets N streaming completion requests (token-id prompts, exact
output lengths: ignore_eos) from the official openai client, at most --concurrency in flight; then, with the
server stopped, `LLM.generate` runs the same requests with max_num_seqs = --concurrency. The ratio of output
tokens/s is what HTTP, SSE and the async engine cost. TTFT p50 is measured separately at low load (one request
at a time). Prompts are cut from data/pycode-valid.txt (lengths uniform in [32, 512], outputs in [16, 256]).

    .venv/bin/python benchmarks/serving_throughput.py --num-prompts 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "data" / "pycode-valid.txt"


def workload(model: str, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    from microscale.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(model).encode(TEXT.read_text(), add_special_tokens=False)
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        length = rng.randint(32, 512)
        start = rng.randrange(0, len(ids) - length)
        prompts.append(ids[start : start + length])
        outputs.append(rng.randint(16, 256))
    return prompts, outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "microscale", "serve", args.model, "--port", str(port), "--dtype", args.dtype,
           "--max-num-seqs", str(args.concurrency), "--max-model-len", "1024"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not come up")


async def one_request(client, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(time to first token, output tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, tokens


async def run_load(port: int, args: argparse.Namespace, prompts, outputs, concurrency: int) -> tuple[float, list]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)

    async def limited(prompt, max_tokens):
        async with gate:
            return await one_request(client, args.model, prompt, max_tokens)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p, o) for p, o in zip(prompts, outputs)))
    return time.perf_counter() - start, results


def offline(args: argparse.Namespace, prompts, outputs) -> float:
    from microscale import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.concurrency, max_model_len=1024)
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llama-pycode"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--ttft-requests", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    prompts, outputs = workload(args.model, args.num_prompts, args.seed)
    total_out = sum(outputs)
    port = free_port()
    server = start_server(args, port)
    try:
        low_load = asyncio.run(run_load(port, args, prompts[: args.ttft_requests], [16] * args.ttft_requests, 1))
        client_cpu = time.process_time()
        elapsed, results = asyncio.run(run_load(port, args, prompts, outputs, args.concurrency))
        client_cpu = time.process_time() - client_cpu
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert sum(tokens for _, tokens in results) == total_out, "the server returned other output lengths"
    offline_s = offline(args, prompts, outputs)
    ttfts = sorted(t for t, _ in results)
    record = {
        "model": args.model, "dtype": args.dtype, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "output_tokens": total_out, "http_s": elapsed, "offline_s": offline_s,
        "http_tok_s": total_out / elapsed, "offline_tok_s": total_out / offline_s,
        "http_vs_offline": offline_s / elapsed,
        "ttft_p50_low_load_ms": 1000 * statistics.median(t for t, _ in low_load[1]),
        "ttft_p50_at_concurrency_ms": 1000 * statistics.median(ttfts),
        "client_cpu_s": client_cpu,  # the load generator shares this machine's cores with the server
        "cpus": os.cpu_count(),
    }
    print(f"HTTP {record['http_tok_s']:.1f} tok/s, offline {record['offline_tok_s']:.1f} tok/s: "
          f"{record['http_vs_offline']:.1%} of offline at concurrency {args.concurrency}; TTFT p50 "
          f"{record['ttft_p50_low_load_ms']:.1f} ms at low load, {record['ttft_p50_at_concurrency_ms']:.1f} ms loaded; "
          f"the client used {client_cpu:.1f} s of CPU in {elapsed:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
