"""`microscale bench throughput | serve | plot`: the command-line side of microscale.bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from microscale.bench.config import BenchConfig, add_override_flags, load_config, overrides_from_args
from microscale.bench.report import environment, load_results, print_table, write_json

DEFAULT_SERVER = "http://127.0.0.1:23333"


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="throughput and serving benchmarks (with peers)",
                           description="Benchmarks: offline throughput, online serving load, charts.")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    tp = bench_sub.add_parser(
        "throughput", help="offline throughput of one backend (microscale, transformers, vllm)",
        description="Offline throughput, engine in-process. Settings come from --config YAML (sections engine "
                    "and data) and flags of the same names, flags winning.")
    tp.add_argument("--config", default=None, metavar="YAML", help="bench.yaml with engine: and data: sections")
    add_override_flags(tp, ("engine", "data"))
    _add_output_args(tp)
    tp.set_defaults(func=cmd_bench_throughput)

    sv = bench_sub.add_parser(
        "serve", help="online load against an OpenAI-compatible server (ours or a peer's)",
        description="Streamed /v1/completions load at a concurrency limit and/or a Poisson request rate; "
                    "--sweep runs one load per concurrency.")
    sv.add_argument("--base-url", default=DEFAULT_SERVER, help=f"server root (default {DEFAULT_SERVER})")
    sv.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    sv.add_argument("--tokenizer", default=None, help="tokenizer folder for the dataset (default: --model if it is "
                    "a local folder)")
    sv.add_argument("--api-key", default=None)
    load = sv.add_mutually_exclusive_group()
    load.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    load.add_argument("--sweep", default=None, metavar="N,N,...", help="one run per concurrency, e.g. 1,4,16,64")
    sv.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrivals per second (default inf: all at once)")
    sv.add_argument("--prompt-format", choices=["tokens", "text"], default="tokens",
                    help="send token ids (exact lengths; default) or the prompt text")
    sv.add_argument("--temperature", type=float, default=0.0)
    add_override_flags(sv, ("data",))
    _add_output_args(sv)
    sv.set_defaults(func=cmd_bench_serve)

    pl = bench_sub.add_parser("plot", help="one chart from several bench JSON results",
                              description="Chart several `bench --json` results together (sweeps as lines, "
                                          "single runs as bars).")
    pl.add_argument("results", nargs="+", help="JSON files written by --json")
    pl.add_argument("--out", required=True, metavar="PNG")
    pl.set_defaults(func=cmd_bench_plot)
    bench.set_defaults(verbose=False)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", default=None, help="name of this result in tables and charts")
    p.add_argument("--json", default=None, metavar="FILE", help="write settings and results here")
    p.add_argument("--plot", default=None, metavar="PNG", help="chart this result (with any --compare results)")
    p.add_argument("--compare", nargs="*", default=[], metavar="JSON", help="earlier results to chart beside it")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine details")


def _tokenizer(path: str | None, what: str) -> Any:
    from microscale.tokenizer import Tokenizer

    if path is None or not (Path(path) / "tokenizer.json").is_file():
        raise ValueError(f"{what}: no tokenizer.json in {path!r}; pass --tokenizer FOLDER.")
    return Tokenizer.from_pretrained(path)


def _load_requests(config: BenchConfig, tokenizer: Any, vocab_size: int | None) -> tuple[list, dict[str, Any]]:
    from microscale.bench.datasets import load_dataset

    d = config.data
    dataset = load_dataset(d.dataset_path, tokenizer, num_prompts=d.num_prompts, input_len=d.input_len,
                           output_len=d.output_len, seed=d.seed, range_ratio=d.range_ratio,
                           sharegpt_output_len=d.sharegpt_output_len, max_model_len=config.engine.max_model_len)
    largest = max(max(r.prompt_token_ids) for r in dataset.requests)
    if vocab_size is not None and largest >= vocab_size:
        raise ValueError(f"the tokenizer's ids reach {largest} but the model's vocabulary has {vocab_size} entries.")
    if len(dataset.requests) < d.num_prompts:
        print(f"note: {d.dataset_path} gave {len(dataset.requests)} usable prompts of {d.num_prompts} asked",
              file=sys.stderr)
    info = {"name": dataset.name, "num_requests": len(dataset.requests), "skipped": dataset.skipped,
            "input_tokens": sum(len(r.prompt_token_ids) for r in dataset.requests),
            "output_tokens": sum(r.output_len for r in dataset.requests)}
    return dataset.requests, info


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    from microscale.bench.throughput import run_throughput
    from microscale.models.loader import resolve_model_path

    config = load_config(args.config, overrides_from_args(args))
    config.engine.model_path = str(resolve_model_path(config.engine.model_path))
    tokenizer = _tokenizer(config.engine.tokenizer or config.engine.model_path, "engine.model_path")
    model_config = json.loads((Path(config.engine.model_path) / "config.json").read_text())
    requests, dataset = _load_requests(config, tokenizer, model_config.get("vocab_size"))
    run = run_throughput(config, requests)
    e = config.engine
    label = args.label or e.backend + "".join(f" {q}" for q in (e.quant, e.kv_cache_quant) if q != "none")
    record = {"kind": "throughput", "label": label, "settings": {**config.to_dict(), "dataset": dataset},
              "environment": environment(), "runs": [run]}
    _finish(args, record)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    import httpx

    from microscale.bench.serve_load import LoadSettings, list_models, run_load

    config = load_config(None, overrides_from_args(args))
    sweep = _parse_sweep(args.sweep) if args.sweep else [args.max_concurrency]
    try:
        models = list_models(args.base_url, args.api_key)
    except httpx.HTTPStatusError as e:
        raise ValueError(f"{args.base_url}/v1/models answered {e.response.status_code}: {e.response.text[:200]}"
                         " (--api-key?)") from None
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {args.base_url}/v1/models: {e}") from None
    model = args.model or (models[0] if models else None)
    if model is None:
        raise ValueError(f"{args.base_url} serves no model.")
    tokenizer = _tokenizer(args.tokenizer or model, "bench serve")
    requests, dataset = _load_requests(config, tokenizer, None)
    runs = []
    for concurrency in sweep:
        settings = LoadSettings(args.base_url, model, concurrency, args.request_rate, config.data.seed,
                                args.prompt_format, args.temperature, args.api_key)
        runs.append(run_load(settings, requests))
    settings_out = {"base_url": args.base_url, "model": model, "sweep": sweep, "request_rate": str(args.request_rate),
                    "prompt_format": args.prompt_format, "temperature": args.temperature,
                    "data": config.to_dict()["data"], "dataset": dataset}
    record = {"kind": "serve", "label": args.label or model, "settings": settings_out, "environment": environment(),
              "runs": runs}
    _finish(args, record)


def _parse_sweep(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--sweep takes concurrencies of at least 1, got {text!r}")
    return values


def _finish(args: argparse.Namespace, record: dict[str, Any]) -> None:
    print_table(record)
    failed = sum(run["failed"] for run in record["runs"])
    if failed:
        errors = sorted({e for run in record["runs"] for e in run["errors"]})
        print(f"warning: {failed} requests failed, e.g. {errors[0]}", file=sys.stderr)
    if args.json:
        write_json(args.json, record)
        print(f"wrote {args.json}")
    if args.plot:
        from microscale.bench.plot import plot_results

        print(f"wrote {plot_results([record, *(load_results(p) for p in args.compare)], args.plot)}")


def cmd_bench_plot(args: argparse.Namespace) -> None:
    from microscale.bench.plot import plot_results

    print(f"wrote {plot_results([load_results(p) for p in args.results], args.out)}")
