"""Offline throughput: microscale vs Hugging Face transformers `generate` (and optionally vLLM's CPU build).

The shape of an offline job: N requests (default 200) whose prompts are cut from a validation text, prompt
lengths drawn uniformly from [32, 512] tokens and output lengths from [16, 256] (seeded), greedy, ignore_eos,
so that every engine produces exactly the same number of tokens for every request.

- microscale: one `LLM.generate` call over all requests (continuous batching, max_num_seqs=32).
- transformers: padded batches of 32 in arrival order (left padding), each generated to the longest output
  length of its batch; only each request's own requested tokens count as useful output. The rest is the
  waste of static batching that continuous batching avoids.
- vLLM (optional): run in its own virtualenv (`--vllm-python`) as a subprocess, given the same token ids and
  lengths through a temp JSON file (see benchmarks/vllm_worker.py).

Examples:
    .venv/bin/python benchmarks/offline_throughput.py                       # tiny-llama-pycode, float32
    .venv/bin/python benchmarks/offline_throughput.py --dtype float32,bfloat16 --num-prompts 20
    .venv/bin/python benchmarks/offline_throughput.py --model configs/models/SmolLM2-135M --load-format dummy
    .venv/bin/python benchmarks/offline_throughput.py --engines microscale,transformers,vllm \\
        --vllm-python /tmp/vllm-venv/bin/python --json bench-results/offline.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "models/tiny-llama-pycode"
DEFAULT_DATASET = "data/pycode-valid.txt"
DEFAULT_TOKENIZER = "models/tiny-llama-pycode"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ENGINES = ("microscale", "transformers", "vllm")
HF_USEFUL_NOTE = (
    "transformers: padded static batches; each batch is generated to its longest requested output, and only "
    "each request's own requested output tokens are counted as useful output (the rest is waste)."
)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class Result:
    engine: str
    dtype: str
    requests: int
    output_tokens: int  # useful output tokens (each request's own max_tokens)
    elapsed_s: float
    generated_tokens: int  # tokens actually computed (transformers: padded to each batch's longest)
    torch_threads: int
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    token_ids: list[list[int]] | None = field(default=None, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def _loadavg() -> tuple[float, float, float]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (float("nan"),) * 3  # type: ignore[return-value]


# ---- workload -------------------------------------------------------------------------------------------------


def build_workload(args: argparse.Namespace, tokenizer_dir: Path, vocab_size: int) -> Workload:
    from tokenizers import Tokenizer

    dataset = _resolve(args.dataset)
    if not dataset.is_file():
        raise SystemExit(f"Dataset {dataset} not found (--dataset).")
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tok.encode(dataset.read_text(), add_special_tokens=False).ids
    if max(ids) >= vocab_size:
        raise SystemExit(f"Tokenizer ids reach {max(ids)} but the model's vocab is {vocab_size}.")
    if len(ids) <= args.max_prompt_len:
        raise SystemExit(f"{dataset} has only {len(ids)} tokens; need more than --max-prompt-len.")
    rng = random.Random(args.seed)
    prompts, output_lens = [], []
    for _ in range(args.num_prompts):
        n = rng.randint(args.min_prompt_len, args.max_prompt_len)
        start = rng.randrange(0, len(ids) - n)
        prompts.append(ids[start : start + n])
        output_lens.append(rng.randint(args.min_output_len, args.max_output_len))
    return Workload(prompts, output_lens)


def prepare_model_dir(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """The folder the engines load, and the folder holding the tokenizer used to cut the prompts.

    With --load-format dummy the model folder may hold only config.json (configs/models/*): the engines then
    get a temp folder with that config.json plus the bundled tokenizer files (--tokenizer)."""
    model_dir = _resolve(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} has no config.json (--model).")
    if (model_dir / "tokenizer.json").is_file():
        return model_dir, model_dir
    if args.load_format != "dummy":
        raise SystemExit(f"{model_dir} has no tokenizer.json; only --load-format dummy can run a config-only folder.")
    tok_dir = _resolve(args.tokenizer)
    folder = tmp / f"dummy-{model_dir.name}"
    folder.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, folder / name)
    return folder, folder


# ---- engines --------------------------------------------------------------------------------------------------


def run_microscale(args: argparse.Namespace, model_dir: Path, dtype: str, work: Workload) -> Result:
    import microscale
    from microscale import LLM, SamplingParams

    # The context the workload needs (as given to vLLM), not the model's full max_position_embeddings.
    llm = LLM(str(model_dir), dtype=dtype, max_num_seqs=args.max_num_seqs, load_format=args.load_format,
              seed=args.seed, max_model_len=args.max_prompt_len + args.max_output_len)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    # Warm-up (not timed): first-call allocations and kernel selection.
    llm.generate([{"prompt_token_ids": p} for p in work.prompts[:2]],
                 [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * min(2, len(work.prompts)),
                 use_tqdm=False)
    before = _loadavg()
    cpu0, start = time.process_time(), time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    produced = sum(len(t) for t in token_ids)
    stats = llm.engine.get_stats()
    del llm
    gc.collect()
    return Result(
        "microscale", dtype, len(work.prompts), produced, elapsed, produced, torch.get_num_threads(), before,
        _loadavg(), microscale.__version__,
        extra={"max_num_seqs": args.max_num_seqs, "num_preemptions": stats["num_preemptions"],
               "prefix_cache_hits": stats["prefix_cache_hits"], "process_cpu_s": round(cpu_s, 2)},
        token_ids=token_ids,
    )


def run_transformers(args: argparse.Namespace, model_dir: Path, dtype: str, work: Workload) -> Result:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if args.load_format == "dummy":
        config = AutoConfig.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.eval()
    pad_id = model.generation_config.pad_token_id
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    pad_id = 0 if pad_id is None else pad_id
    # Never stop on EOS: every request must produce exactly its requested length (as ignore_eos).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_id

    def generate(prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding
            input_ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id,
            )
        return out[:, width:]

    generate(work.prompts[:2], 4)  # warm-up, not timed
    bs = args.hf_batch_size
    token_ids: list[list[int]] = []
    generated = 0
    before = _loadavg()
    cpu0, start = time.process_time(), time.perf_counter()
    for i in range(0, len(work.prompts), bs):
        lens = work.output_lens[i : i + bs]
        new = generate(work.prompts[i : i + bs], max(lens))
        if new.shape[1] != max(lens):
            raise RuntimeError(f"transformers stopped early: {new.shape[1]} of {max(lens)} tokens")
        generated += new.numel()
        token_ids.extend(row[:n] for row, n in zip(new.tolist(), lens))
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu0
    useful = sum(len(t) for t in token_ids)
    return Result(
        "transformers", dtype, len(work.prompts), useful, elapsed, generated, torch.get_num_threads(), before,
        _loadavg(), transformers.__version__,
        extra={"batch_size": bs, "padding": "left", "useful_fraction": round(useful / generated, 3),
               "process_cpu_s": round(cpu_s, 2)},
        token_ids=token_ids,
    )


def run_vllm(args: argparse.Namespace, model_dir: Path, dtype: str, work: Workload, tmp: Path) -> Result:
    python = args.vllm_python
    if not python or not Path(python).is_file():
        raise RuntimeError(f"--vllm-python {python!r} is not a file (vLLM runs in its own virtualenv).")
    request = {
        "model": str(model_dir),
        "dtype": dtype,
        "load_format": args.load_format,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_prompt_len + args.max_output_len,
        "seed": args.seed,
        "prompts": work.prompts,
        "output_lens": work.output_lens,
    }
    req_file, res_file = tmp / f"vllm-request-{dtype}.json", tmp / f"vllm-result-{dtype}.json"
    req_file.write_text(json.dumps(request))
    env = dict(os.environ)
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.vllm_kv_cache_space))
    for key, value in _parse_env(args.vllm_env).items():
        env[key] = value
    cmd = [python, str(Path(__file__).with_name("vllm_worker.py")), str(req_file), str(res_file)]
    log_file = tmp / f"vllm-{dtype}.log"
    before = _loadavg()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.vllm_timeout)
    log_text = log_file.read_text()
    if args.keep_logs:
        dest = Path(args.keep_logs) / log_file.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(log_text)
    if proc.returncode != 0 or not res_file.is_file():
        tail = "\n".join(log_text.splitlines()[-25:])
        raise RuntimeError(f"vLLM worker exited with {proc.returncode}; last lines of its log:\n{tail}")
    res = json.loads(res_file.read_text())
    # How vLLM's CPU backend placed its compute threads (it reserves cores for its frontend by default).
    res["log_threading"] = [
        line.split("]", 1)[-1].strip() for line in log_text.splitlines()
        if "core ids=" in line or "Reducing Torch threads" in line or "reserved_cpus=" in line
    ]
    threads = res["torch_threads"]
    for line in res["log_threading"]:
        match = re.search(r"core ids=\[([\d, ]*)\]", line)
        if match:  # the OpenMP threads of the worker process that runs the model
            threads = len([c for c in match.group(1).split(",") if c.strip()])
    token_ids = res["token_ids"]
    produced = sum(len(t) for t in token_ids)
    return Result(
        "vllm", dtype, len(work.prompts), produced, res["elapsed_s"], produced, threads, before,
        _loadavg(), res["vllm_version"],
        extra={k: v for k, v in res.items() if k not in ("token_ids", "elapsed_s")},
        token_ids=token_ids,
    )


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--vllm-env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


# ---- report ---------------------------------------------------------------------------------------------------


def agreement(a: list[list[int]], b: list[list[int]], prefix: int = 16) -> dict[str, float]:
    """How often two engines' greedy outputs agree (informational: bf16 and padding legitimately differ)."""
    same_prefix = sum(x[:prefix] == y[:prefix] for x, y in zip(a, b))
    same_all = sum(x == y for x, y in zip(a, b))
    return {
        f"first_{prefix}_tokens_equal": round(same_prefix / len(a), 3),
        "all_tokens_equal": round(same_all / len(a), 3),
    }


def _cpu_util(r: Result) -> str:
    """Process CPU seconds per wall second: about `threads` on a quiet machine, less when others take the cores."""
    cpu = r.extra.get("process_cpu_s")
    return "-" if cpu is None or r.elapsed_s <= 0 else f"{cpu / r.elapsed_s:.2f}"


def print_table(results: list[Result]) -> None:
    cols = ["engine", "dtype", "requests", "output tokens", "elapsed s", "output tok/s", "vs transformers",
            "threads", "cpu/wall", "loadavg before", "loadavg after"]
    rows = []
    for r in results:
        base = next((b for b in results if b.engine == "transformers" and b.dtype == r.dtype), None)
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
        rows.append([r.engine, r.dtype, str(r.requests), str(r.output_tokens), f"{r.elapsed_s:.2f}",
                     f"{r.tokens_per_s:.1f}", ratio, str(r.torch_threads), _cpu_util(r),
                     "/".join(f"{x:.2f}" for x in r.loadavg_before), "/".join(f"{x:.2f}" for x in r.loadavg_after)])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if any(r.engine == "vllm" for r in results):
        print("# vllm: 'threads' is its model worker's OpenMP threads; by default its CPU backend binds them to the "
              "cores it does not reserve for its frontend process (VLLM_CPU_OMP_THREADS_BIND=auto).")
    if any(r.engine == "transformers" for r in results):
        print(f"# {HF_USEFUL_NOTE}")
        for r in results:
            if r.engine == "transformers":
                print(f"#   transformers {r.dtype}: generated {r.generated_tokens} tokens, {r.output_tokens} useful "
                      f"({r.extra['useful_fraction']:.0%})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder (with --load-format dummy: any folder "
                   "with a config.json, e.g. configs/models/SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, or a comma-separated list of them")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="text the prompts are cut from (relative to the repo)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto", help="dummy: random weights")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="tokenizer files for a config-only --model folder with --load-format dummy")
    p.add_argument("--engines", default="microscale,transformers", help=f"comma-separated subset of {ENGINES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-prompt-len", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--min-output-len", type=int, default=16)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=32, help="microscale / vLLM concurrent sequences")
    p.add_argument("--hf-batch-size", type=int, default=32, help="transformers static batch size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="python of the vLLM virtualenv")
    p.add_argument("--vllm-kv-cache-space", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (whole GiB)")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for vLLM")
    p.add_argument("--vllm-timeout", type=float, default=3600)
    p.add_argument("--keep-logs", default=None, metavar="DIR", help="copy the vLLM worker log here")
    p.add_argument("--json", default=None, metavar="FILE", help="write settings and results as JSON")
    args = p.parse_args(argv)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engine_list) - set(ENGINES)
    if unknown:
        p.error(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    args.dtype_list = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if any(d not in ("float32", "bfloat16") for d in args.dtype_list):
        p.error("--dtype takes float32 and/or bfloat16")
    if not 0 < args.min_prompt_len <= args.max_prompt_len or not 0 < args.min_output_len <= args.max_output_len:
        p.error("length ranges must be positive and ordered")
    return args


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import microscale

        out["microscale"] = microscale.__version__
    except ImportError:
        pass
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:  # which microscale code was measured
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "microscale"],
                               capture_output=True, text=True, check=True).stdout.strip()
        out["microscale_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="offline-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir, tokenizer_dir = prepare_model_dir(args, tmp)
        config = json.loads((model_dir / "config.json").read_text())
        work = build_workload(args, tokenizer_dir, config["vocab_size"])
        header = {
            "model": f"{args.model} ({config.get('architectures', ['?'])[0]}, load_format={args.load_format})",
            "workload": (f"{len(work.prompts)} requests, prompts {args.min_prompt_len}-{args.max_prompt_len} tokens "
                         f"(total {work.num_prompt_tokens}), outputs {args.min_output_len}-{args.max_output_len} "
                         f"(total {work.num_output_tokens}), greedy, ignore_eos, seed {args.seed}"),
            "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch.get_num_threads()="
                       f"{torch.get_num_threads()}, loadavg at start {_loadavg()}",
        }
        print("\n".join(f"# {k}: {v}" for k, v in header.items()), flush=True)
        results: list[Result] = []
        errors: dict[str, str] = {}
        for dtype in args.dtype_list:
            for engine in args.engine_list:
                print(f"... running {engine} {dtype}", flush=True)
                try:
                    if engine == "microscale":
                        res = run_microscale(args, model_dir, dtype, work)
                    elif engine == "transformers":
                        res = run_transformers(args, model_dir, dtype, work)
                    else:
                        res = run_vllm(args, model_dir, dtype, work, tmp)
                except Exception as e:  # one engine failing must not lose the others' figures
                    errors[f"{engine}/{dtype}"] = f"{type(e).__name__}: {e}"
                    print(f"!!! {engine} {dtype} failed: {type(e).__name__}: {e}", flush=True)
                    continue
                if res.output_tokens != work.num_output_tokens:
                    print(f"!!! {engine} {dtype} produced {res.output_tokens} useful tokens, expected "
                          f"{work.num_output_tokens}", flush=True)
                print(f"    {engine} {dtype}: {res.output_tokens} tokens in {res.elapsed_s:.2f}s = "
                      f"{res.tokens_per_s:.1f} tok/s (loadavg {res.loadavg_after})", flush=True)
                results.append(res)
        print()
        print_table(results)
        agree = {}
        # With dummy weights every engine draws its own random weights: their outputs cannot agree.
        for dtype in args.dtype_list if args.load_format != "dummy" else []:
            by_engine = {r.engine: r for r in results if r.dtype == dtype}
            base = by_engine.get("transformers")
            for r in by_engine.values():
                if base is not None and r is not base and r.token_ids and base.token_ids:
                    agree[f"{r.engine}_vs_transformers/{dtype}"] = agreement(r.token_ids, base.token_ids)
        if agree:
            print(f"# greedy agreement (informational): {json.dumps(agree)}")
        for key, err in errors.items():
            print(f"# FAILED {key}: {err.splitlines()[0]}")
        if args.json:
            out = {
                "settings": {k: v for k, v in vars(args).items()},
                "header": header,
                "versions": versions(),
                "note": HF_USEFUL_NOTE,
                "workload": {"prompt_lens": [len(p) for p in work.prompts], "output_lens": work.output_lens,
                             "prompt_tokens": work.num_prompt_tokens, "output_tokens": work.num_output_tokens},
                "results": [
                    {**{k: v for k, v in asdict(r).items() if k != "token_ids"}, "tokens_per_s": r.tokens_per_s,
                     "ratio_vs_transformers": _ratio(r, results)}
                    for r in results
                ],
                "greedy_agreement": agree,
                "errors": errors,
            }
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=2))
            print(f"# wrote {path}")
    return 1 if errors and not results else 0


def _ratio(r: Result, results: list[Result]) -> float | None:
    base = next((b for b in results if b.engine == "transformers" and b.dtype == r.dtype), None)
    return None if base is None else r.tokens_per_s / base.tokens_per_s


if __name__ == "__main__":
    sys.exit(main())
