"""The vLLM side of benchmarks/offline_throughput.py, run with the python of a separate vLLM virtualenv.

Usage: <vllm-venv>/bin/python benchmarks/vllm_worker.py REQUEST.json RESULT.json

REQUEST.json holds the model folder, dtype, load_format, max_num_seqs, max_model_len, seed, the prompts as
token ids and each request's output length; RESULT.json gets the timing, the output token ids and versions.
Imports nothing from microscale.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    req_path, res_path = sys.argv[1], sys.argv[2]
    with open(req_path) as f:
        req = json.load(f)
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=req["model"],
        dtype=req["dtype"],
        load_format=req["load_format"],
        max_num_seqs=req["max_num_seqs"],
        max_model_len=req["max_model_len"],
        seed=req["seed"],
    )
    prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in req["output_lens"]]
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:2], [warm] * len(prompts[:2]), use_tqdm=False)  # warm-up, not timed
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {
        "elapsed_s": elapsed,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }
    with open(res_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
