"""Batch-1 decode speed on CPU: microscale eager, microscale compiled (torch.compile, the CPU default),
transformers and optionally llama.cpp, on the same checkpoint and the same token ids. Runs alternate prompt by
prompt (eager, compiled, transformers, llama.cpp, eager, ...) and each backend keeps its best of --repeats per
prompt (the machine is shared); ratios are to transformers (and to llama.cpp). Greedy outputs are compared with
microscale eager's.

    .venv/bin/python benchmarks/cpu_batch1.py --model models/tiny-llama-pycode --dtypes float32,bfloat16
    .venv/bin/python benchmarks/cpu_batch1.py --model configs/models/SmolLM2-135M --dtypes float32,bfloat16 \\
        --prompts 2 --new-tokens 64
    .venv/bin/python benchmarks/cpu_batch1.py --startup   # start-up with compilation: cold, then cached
    .venv/bin/python benchmarks/cpu_batch1.py --llamacpp-python /work/peers/llamacpp-venv/bin/python \\
        --llamacpp-source /work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp

llama.cpp runs in benchmarks/llamacpp_worker.py under the Python of a virtualenv with llama-cpp-python, on a GGUF
(f32 or bf16, as the dtype) that llama.cpp's own convert_hf_to_gguf.py (in --llamacpp-source, with its gguf-py)
writes from the checkpoint once per run, run by this Python (it needs torch).

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


def gguf_model(path: Path, dtype: str, source: Path, workdir: Path) -> Path:
    """The checkpoint converted to GGUF in `dtype` by llama.cpp's converter in `source`."""
    outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
    out = workdir / f"{path.name}-{outtype}.gguf"
    # The checkpoints here carry a BPE tokenizer.json of our own vocabulary with Llama 3's pre-tokenizer regex: the
    # converter's probing (sentencepiece first, then a table of known vocabulary hashes) would reject it, so the
    # GPT-2 style vocabulary is written as "llama-bpe" directly. Only token ids are exchanged, so it is never used.
    code = ("import runpy, sys; source = sys.argv[1]; sys.path[:0] = [source + '/gguf-py', source]; "
            "from conversion.base import TextModel; from conversion.llama import LlamaModel; "
            "LlamaModel.set_vocab = TextModel._set_vocab_gpt2; "
            "TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama-bpe'; "
            "sys.argv = [source + '/convert_hf_to_gguf.py', *sys.argv[2:]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    if not out.exists():
        done = subprocess.run([sys.executable, "-c", code, str(source), str(path), "--outtype", outtype,
                               "--outfile", str(out)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return out


class LlamaCpp:
    """llama.cpp through llama-cpp-python in another virtualenv (benchmarks/llamacpp_worker.py), spoken to by JSON
    lines over its stdin and stdout."""

    def __init__(self, python: str, gguf: Path, threads: int) -> None:
        started = time.perf_counter()
        self.worker = subprocess.Popen([python, str(Path(__file__).with_name("llamacpp_worker.py")), str(gguf),
                                        str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self.reply()["llama_cpp"]
        self.start_s, self.compile_s = time.perf_counter() - started, None

    def reply(self) -> dict:
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited with status {self.worker.wait()} (its stderr is above)")
        return json.loads(line)

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self.worker.stdin.write(json.dumps({"prompt": prompt, "max_tokens": n}) + "\n")
        self.worker.stdin.flush()
        return self.reply()["token_ids"]

    def close(self) -> None:
        self.worker.stdin.close()
        self.worker.wait()


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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(path: Path, dtype: str, args: argparse.Namespace, ids: list[list[int]], workdir: Path) -> dict:
    backends = {
        "microscale eager": lambda: Microscale(path, dtype, eager=True),
        "microscale compiled": lambda: Microscale(path, dtype, eager=False),
        "transformers": lambda: Transformers(path, dtype),
    }
    if args.llamacpp_python:
        gguf = gguf_model(path, dtype, Path(args.llamacpp_source), workdir)
        backends["llama.cpp"] = lambda: LlamaCpp(args.llamacpp_python, gguf, args.threads)
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
    if "llama.cpp" in built:
        built["llama.cpp"].close()
    rates = {name: len(ids) * (args.new_tokens - 1) / sum(times) for name, times in best.items()}
    reference = outputs["microscale eager"]
    out = {name: {"decode_tok_s": round(rate, 1), "vs_transformers": round(rate / rates["transformers"], 2),
                  "greedy_equal_to_eager": sum(a == b for a, b in zip(outputs[name], reference)),
                  "greedy_prefix_equal_to_eager": [common_prefix(a, b) for a, b in zip(outputs[name], reference)],
                  "start_s": round(built[name].start_s, 2),
                  "compile_s": None if built[name].compile_s is None else round(built[name].compile_s, 2)}
           for name, rate in rates.items()}
    if "llama.cpp" in built:
        out["llama.cpp"]["version"] = built["llama.cpp"].version
        for name, rate in rates.items():
            out[name]["vs_llamacpp"] = round(rate / rates["llama.cpp"], 2)
    return out


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
    p.add_argument("--llamacpp-python", default=None,
                   help="Python of a virtualenv with llama-cpp-python: adds llama.cpp as a backend")
    p.add_argument("--llamacpp-source", default=None,
                   help="llama.cpp source folder with convert_hf_to_gguf.py and gguf-py/ (with --llamacpp-python)")
    args = p.parse_args()
    if args.llamacpp_python and not args.llamacpp_source:
        p.error("--llamacpp-python needs --llamacpp-source (llama.cpp's converter makes the GGUF)")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        path = checkpoint(Path(args.model), Path(workdir))
        results: dict = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "load_average_before": [round(x, 2) for x in load_before]}
        ids = prompts(args.prompts, args.prompt_len)
        results["load_average_per_dtype"] = {}
        for dtype in args.dtypes.split(","):
            before = os.getloadavg()[0]
            results[dtype] = startup(path, dtype) if args.startup else run(path, dtype, args, ids, Path(workdir))
            results["load_average_per_dtype"][dtype] = [round(before, 2), round(os.getloadavg()[0], 2)]
            print(dtype, json.dumps(results[dtype], indent=1), flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
