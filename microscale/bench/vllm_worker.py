"""The vLLM side of `microscale bench throughput --backend vllm`, run by the python of a vLLM virtualenv.

Usage: <vllm-python> vllm_worker.py JOB.json RESULT.json

JOB.json holds the engine settings, the prompts as token ids and each request's output length; RESULT.json gets
the timing, the output token ids, versions and the gpu_memory_utilization vLLM ran with. Imports nothing from
microscale (it is not installed there).
"""

from __future__ import annotations

import inspect
import json
import sys
import time

# JOB.json keys passed to vllm.LLM when set (None means: vLLM's default).
ENGINE_KEYS = ("model", "tokenizer", "dtype", "load_format", "max_num_seqs", "max_num_batched_tokens",
               "max_model_len", "seed", "gpu_memory_utilization", "quantization", "kv_cache_dtype")


def main() -> int:
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(**{k: job[k] for k in ENGINE_KEYS if job.get(k) is not None})
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in job["output_lens"]]
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:2], [warm] * len(prompts[:2]), use_tqdm=False)  # warm-up, not timed
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {
        "elapsed_s": elapsed,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "vllm_version": vllm.__version__,
        "torch_threads": torch.get_num_threads(),
        # The job's, else vLLM's default: what its KV cache was sized with.
        "gpu_memory_utilization": job.get("gpu_memory_utilization") or _default(LLM, "gpu_memory_utilization"),
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


def _default(cls: type, name: str) -> object:
    """The default of a keyword of cls(...), None if it takes no such keyword by name."""
    param = inspect.signature(cls).parameters.get(name)
    return None if param is None else param.default


if __name__ == "__main__":
    sys.exit(main())
