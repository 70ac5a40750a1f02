"""Batch-1 decode speed on CPU: microscale eager, microscale compiled (torch.compile, the CPU default) and
transformers, in one process, on the same checkpoint and the same token ids. Runs alternate prompt by prompt
(eager, compiled, transformers, eager, ...) and each backend keeps its best of --repeats per prompt (the machine
is shared); ratios are to transformers. Greedy outputs are compared with microscale eager's.

    .venv/bin/python benchmarks/cpu_batch1.py --model models/tiny-llama-pycode --dtypes float32,bfloat16
    .venv/bin/python benchmarks/cpu_batch1.py --model configs/models/SmolLM2-135M --dtypes float32,bfloat16 \\
        --prompts 2 --new-tokens 64
    .venv/bin/python benchmarks/cpu_batch1.py --startup   # start-up with compilation: cold, then cached

A config-only folder (configs/models/...) gets random weights written once by transformers (seed 0), which
every backend then loads. Decode tokens/s of one prompt: (N - 1) / (time to N new tokens - time to 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from microscale import LLM, SamplingParams

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "models" / "tiny-llama-pycode"
TEXT = REPO / "data" / "pycode-valid.txt"


def checkpoint(model: Path, workdir: Path) -> Path:
    """`model` itself when it has weights, else random weights of its config.json saved beside the tokenizer."""
    if any(model.glob("*.safetensors")):
        return model
    out = workdir / model.name
    if not out.exists():
        torch.manual_seed(0)
        config = transformers.AutoConfig.from_pretrained(model)
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        hf.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / name).write_bytes((TOKENIZER / name).read_bytes())
    return out


def prompts(count: int, length: int) -> list[list[int]]:
    ids = transformers.AutoTokenizer.from_pretrained(TOKENIZER)(TEXT.read_text()[:200_000])["input_ids"]
    stride = len(ids) // count
    return [ids[i * stride : i * stride + length] for i in range(count)]


class Microscale:
    def __init__(self, path: Path, dtype: str, eager: bool) -> None:
        started = time.perf_counter()
        self.llm = LLM(str(path), dtype=dtype, max_model_len=1024, max_num_seqs=1, enforce_eager=eager)
        self.start_s = time.perf_counter() - started
        self.compile_s = self.llm.engine.compile_seconds

    def generate(self, prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return self.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids


class Transformers:
    def __init__(self, path: Path, dtype: str) -> None:
        started = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        self.model.generation_config.eos_token_id = None
        self.start_s, self.compile_s = time.perf_counter() - started, None

    @torch.inference_mode()
    def generate(self, prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)
        return out[0, len(prompt) :].tolist()


def decode_seconds(backend, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """Seconds of the n - 1 decode steps of one prompt, and its greedy output."""
    began = time.perf_counter()
    backend.generate(prompt, 1)
    first = time.perf_counter() - began
    began = time.perf_counter()
    output = backend.generate(prompt, n)
    return time.perf_counter() - began - first, output


def run(path: Path, dtype: str, args: argparse.Namespace, ids: list[list[int]]) -> dict:
    backends = {
        "microscale eager": lambda: Microscale(path, dtype, eager=True),
        "microscale compiled": lambda: Microscale(path, dtype, eager=False),
        "transformers": lambda: Transformers(path, dtype),
    }
    built = {name: make() for name, make in backends.items()}
    for backend in built.values():
        decode_seconds(backend, ids[0], 8)  # warm-up
    # Alternated prompt by prompt (a burst of load on the shared machine hits one measurement, not one backend's
    # whole run); each backend keeps its best time per prompt.
    best: dict[str, list[float]] = {name: [float("inf")] * len(ids) for name in built}
    outputs: dict[str, list[list[int]]] = {name: [[] for _ in ids] for name in built}
    for _ in range(args.repeats):
        for i, prompt in enumerate(ids):
            for name, backend in built.items():
                seconds, outputs[name][i] = decode_seconds(backend, prompt, args.new_tokens)
                best[name][i] = min(best[name][i], seconds)
    rates = {name: len(ids) * (args.new_tokens - 1) / sum(times) for name, times in best.items()}
    reference = outputs["microscale eager"]
    base = rates["transformers"]
    return {name: {"decode_tok_s": round(rate, 1), "vs_transformers": round(rate / base, 2),
                   "greedy_equal_to_eager": sum(a == b for a, b in zip(outputs[name], reference)),
                   "start_s": round(built[name].start_s, 2),
                   "compile_s": None if built[name].compile_s is None else round(built[name].compile_s, 2)}
            for name, rate in rates.items()}


def startup(path: Path, dtype: str) -> dict:
    """Seconds to build the engine (compilation included) in fresh processes: an empty compile cache, then the
    cache it left; and eager for reference."""
    code = ("import sys, time; from microscale import LLM; t = time.perf_counter(); "
            "llm = LLM(sys.argv[1], dtype=sys.argv[2], max_model_len=1024, max_num_seqs=1, enforce_eager=sys.argv[3] "
            "== '1'); print(time.perf_counter() - t, llm.engine.compile_seconds)")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for label, eager in (("eager", "1"), ("compiled, empty cache", "0"), ("compiled, cached", "0")):
            done = subprocess.run([sys.executable, "-c", code, str(path), dtype, eager], env=env, check=True,
                                  capture_output=True, text=True)
            total, compile_s = done.stdout.split()
            out[label] = {"engine_start_s": round(float(total), 1),
                          "compile_s": None if compile_s == "None" else round(float(compile_s), 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "tiny-llama-pycode"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--startup", action="store_true", help="measure start-up times instead")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        path = checkpoint(Path(args.model), Path(workdir))
        results: dict = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "load_average_before": [round(x, 2) for x in load_before]}
        ids = prompts(args.prompts, args.prompt_len)
        for dtype in args.dtypes.split(","):
            results[dtype] = startup(path, dtype) if args.startup else run(path, dtype, args, ids)
            print(dtype, json.dumps(results[dtype], indent=1), flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
