"""llama.cpp side of benchmarks/cpu_batch1.py, run by the Python of a virtualenv that has llama-cpp-python (it
needs no torch, so it lives apart from the project's venv):

    /path/to/llamacpp-venv/bin/python benchmarks/llamacpp_worker.py MODEL.gguf THREADS

Prints one JSON line when the model is loaded ({"llama_cpp": version, "start_s": seconds}), then answers each
request line {"prompt": [token ids], "max_tokens": n} with {"token_ids": [n greedy token ids]}. The prompt is
evaluated from an empty KV cache every time (no prefix reuse between requests), like the other backends.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"llama_cpp": llama_cpp.__version__, "start_s": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        llm.reset()  # forget the previous prompt: without it generate() reuses the matching prefix's KV cache
        output = []
        # top_k=1 and temperature 0: greedy. generate() never stops on EOS by itself, like ignore_eos elsewhere.
        for token in llm.generate(request["prompt"], top_k=1, temp=0.0, repeat_penalty=1.0):
            output.append(token)
            if len(output) == request["max_tokens"]:
                break
        print(json.dumps({"token_ids": output}), flush=True)


if __name__ == "__main__":
    main()
