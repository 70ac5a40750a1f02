"""The CPU C kernels against what they replace, on one machine in one process (ratios, not absolute times: the
machine is shared).

- bfloat16 matmuls: the AMX product (`microscale.kernels.cpu_amx.amx_linear`) vs `F.linear` (oneDNN) at decode
  and prefill row counts, the weight hot in cache; oneDNN again with a new row count every call (what a serving
  engine's prefill chunks bring: oneDNN compiles a kernel per shape); and a decode step's worth of weights (30
  layers of the SmolLM2-135M shape, ~210 MB) read once each, as a forward reads them from memory.
- Decode attention over a paged bfloat16 cache (30 layers, 32 sequences of ~400 tokens, shuffled blocks): the
  kernel with its scores from AMX tiles vs its vector path (`CpuAttention(amx=False)`).
- Prefill attention, one fresh causal chunk of 64-2048 tokens: the AMX flash kernel (`CpuAttention.prefill`,
  reading the paged cache) vs torch's SDPA on the same keys and values (what the torch backend runs), and where
  `prefill_applies` sends each chunk.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_kernels.py --json benchmarks/results/cpu-kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from microscale.kernels.cpu_amx import amx_linear, amx_unavailable_reason
from microscale.kernels.cpu_attention import CpuAttention

MATMUL_SHAPES = [(3072, 576), (576, 1536), (960, 576), (1536, 256), (256, 768), (49152, 576)]
ROWS = [1, 8, 32, 64, 256, 512]
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate+up, down
ATTENTION_SHAPES = [(9, 3, 64), (8, 2, 32), (16, 8, 128)]  # heads, KV heads, head size
PREFILL_LENGTHS = [64, 272, 512, 1024, 2048]


def best_of(fn: Callable[[], object], repeats: int, calls: int) -> float:
    """The best mean seconds per call over `repeats` runs of `calls` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def matmuls(repeats: int) -> list[dict]:
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for n, k in MATMUL_SHAPES:
        w = torch.randn(n, k, generator=gen).bfloat16()
        for m in ROWS:
            x = torch.randn(m, k, generator=gen).bfloat16()
            calls = max(3, min(200, int(2e8 / (n * k * max(m, 16)))))
            onednn = best_of(functools.partial(F.linear, x, w), repeats, calls)
            amx = best_of(functools.partial(amx_linear, x, w), repeats, calls)
            rows_out.append({"n": n, "k": k, "rows": m, "onednn_us": onednn * 1e6, "amx_us": amx * 1e6,
                             "speedup": onednn / amx, "amx_weight_gb_s": n * k * 2 / amx / 1e9})
    return rows_out


def new_row_counts(count: int) -> dict:
    """oneDNN and the AMX product at row counts 301..300+count, each seen once, then the same counts again."""
    w = torch.randn(1536, 256).bfloat16()
    xs = [torch.randn(300 + i, 256).bfloat16() for i in range(1, count + 1)]

    def mean_call(fn: Callable) -> float:
        start = time.perf_counter()
        for x in xs:
            fn(x, w)
        return (time.perf_counter() - start) / count * 1e6

    first, again = mean_call(F.linear), mean_call(F.linear)
    amx = mean_call(amx_linear)
    return {"weight": [1536, 256], "rows": f"301-{300 + count}", "onednn_new_rows_us": first,
            "onednn_same_rows_again_us": again, "amx_us": amx}


def _each_weight(fn: Callable, xs: dict[int, torch.Tensor], weights: list[torch.Tensor]) -> None:
    for w in weights:
        fn(xs[w.shape[1]], w)


def _attention_step(kernel: CpuAttention, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, layers: int) -> None:
    for layer in range(layers):
        kernel(layer, q, k, k, out, q.shape[-1] ** -0.5, None, None)


def decode_step_weights(repeats: int) -> list[dict]:
    """30 layers' weights read once each per pass (none stays in cache between passes), 1 / 8 / 32 rows."""
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(shape, generator=gen).bfloat16() for shape in LAYER_SHAPES * 30]
    total = sum(w.numel() * 2 for w in weights)
    out = []
    for m in (1, 8, 32):
        xs = {k: torch.randn(m, k, generator=gen).bfloat16() for k in (576, 1536)}
        for name, fn in (("onednn", F.linear), ("amx", amx_linear)):
            seconds = best_of(functools.partial(_each_weight, fn, xs, weights), repeats, 1)
            out.append({"rows": m, "kernel": name, "ms": seconds * 1e3, "gb_s": total / seconds / 1e9})
    return out


def attention(repeats: int, layers: int = 30, n: int = 32, context: int = 400) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(2)
    for heads, kv_heads, dim in ATTENTION_SHAPES:
        block = 16
        per_sequence = context // block + 8
        blocks = n * per_sequence
        caches = [(torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16(),
                   torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16()) for _ in range(layers)]
        tables = torch.randperm(blocks, generator=gen).view(n, per_sequence)
        positions = torch.randint(context - 100, context + 100, (n,), generator=gen)
        q = torch.randn(n, heads, dim, generator=gen).bfloat16()
        k = torch.randn(n, kv_heads, dim, generator=gen).bfloat16()
        result = torch.empty_like(q)
        kv_bytes = int((positions + 1).sum()) * kv_heads * dim * 2 * 2 * layers
        row = {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "sequences": n, "layers": layers}
        for amx in (False, True):
            kernel = CpuAttention(caches, amx=amx)
            kernel.set_step(tables[torch.arange(n), positions // block], positions % block, tables, positions)
            seconds = best_of(functools.partial(_attention_step, kernel, q, k, result, layers), repeats, 1)
            row["amx_ms" if amx else "vector_ms"] = seconds * 1e3
            row["amx_gb_s" if amx else "vector_gb_s"] = kv_bytes / seconds / 1e9
        row["speedup"] = row["vector_ms"] / row["amx_ms"]
        out.append(row)
    return out


def prefill_attention(repeats: int) -> list[dict]:
    out = []
    gen = torch.Generator().manual_seed(3)
    for heads, kv_heads, dim in ATTENTION_SHAPES:
        for length in PREFILL_LENGTHS:
            block = 16
            blocks = length // block + 1
            k_cache = torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16()
            v_cache = torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16()
            table = torch.randperm(blocks, generator=gen)
            keys = k_cache[table].flatten(0, 1)[:length].transpose(0, 1)[None]
            values = v_cache[table].flatten(0, 1)[:length].transpose(0, 1)[None]
            q = torch.randn(length, heads, dim, generator=gen).bfloat16()
            result = torch.empty_like(q)
            kernel = CpuAttention([(k_cache, v_cache)])
            scale = dim**-0.5
            sdpa = functools.partial(F.scaled_dot_product_attention, q.transpose(0, 1)[None], keys, values,
                                     is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
            amx = functools.partial(kernel.prefill, 0, q, result, table, 0, scale, None, None)
            calls = max(1, 20_000 // length)
            sdpa_s, amx_s = best_of(sdpa, repeats, calls), best_of(amx, repeats, calls)
            flops = 2 * length * (length + 1) * heads * dim  # q k^T and p v over the causal half
            out.append({"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "queries": length,
                        "sdpa_us": sdpa_s * 1e6, "amx_us": amx_s * 1e6, "speedup": sdpa_s / amx_s,
                        "amx_gflop_s": flops / amx_s / 1e9, "used": kernel.prefill_applies(0, length)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    reason = amx_unavailable_reason(torch.device("cpu"), torch.bfloat16, 16, 32)
    if reason is not None:
        raise SystemExit(f"The AMX kernels cannot run here: {reason}.")
    results = {"threads": torch.get_num_threads(), "matmuls": matmuls(args.repeats),
               "new_row_counts": new_row_counts(99), "decode_step_weights": decode_step_weights(args.repeats),
               "attention": attention(args.repeats), "prefill_attention": prefill_attention(args.repeats)}
    print("| weight [N, K] | rows | oneDNN us | AMX us | AMX vs oneDNN | AMX weight GB/s |\n|---|---|---|---|---|---|")
    for r in results["matmuls"]:
        print(f"| [{r['n']}, {r['k']}] | {r['rows']} | {r['onednn_us']:.1f} | {r['amx_us']:.1f} | "
              f"{r['speedup']:.2f}x | {r['amx_weight_gb_s']:.1f} |")
    fresh = results["new_row_counts"]
    print(f"\n[1536, 256] at rows {fresh['rows']}, one call each: oneDNN {fresh['onednn_new_rows_us']:.0f} us a call "
          f"(new row counts), {fresh['onednn_same_rows_again_us']:.0f} us (the same counts again); AMX "
          f"{fresh['amx_us']:.0f} us")
    print("\n| decode step's weights (30 layers, ~210 MB) | rows | ms | GB/s |\n|---|---|---|---|")
    for r in results["decode_step_weights"]:
        print(f"| {r['kernel']} | {r['rows']} | {r['ms']:.1f} | {r['gb_s']:.1f} |")
    print("\n| attention (heads, KV heads, dim) | vector ms/step | AMX scores ms/step | speedup | AMX KV GB/s |\n"
          "|---|---|---|---|---|")
    for r in results["attention"]:
        print(f"| {r['heads']}, {r['kv_heads']}, {r['head_dim']} | {r['vector_ms']:.2f} | {r['amx_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['amx_gb_s']:.1f} |")
    print("\n| prefill (heads, KV heads, dim) | queries | SDPA us | AMX us | AMX vs SDPA | AMX GFLOP/s | used |\n"
          "|---|---|---|---|---|---|---|")
    for r in results["prefill_attention"]:
        print(f"| {r['heads']}, {r['kv_heads']}, {r['head_dim']} | {r['queries']} | {r['sdpa_us']:.0f} | "
              f"{r['amx_us']:.0f} | {r['speedup']:.2f}x | {r['amx_gflop_s']:.0f} | {'AMX' if r['used'] else 'SDPA'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
