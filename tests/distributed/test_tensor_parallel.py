"""Tensor parallelism on CPU (gloo, two processes): TP=2 gives TP=1's greedy outputs for Llama and gpt-oss,
with continuous batching, preemption, quantized weights and KV caches; bad splits fail before any process
starts; a dead worker ends the engine with a clear error; torchrun-started ranks serve through the OpenAI
server."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from microscale import LLM, SamplingParams
from microscale.distributed.launch import free_port
from microscale.distributed.parallel_state import tp_size

KNOBS = dict(dtype="float32", max_model_len=64, max_num_seqs=3, block_size=4)
PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [300, 12, 12, 8], [61, 70, 71, 72, 90, 91, 5, 17, 99, 3, 250, 42]]
GREEDY = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)


def _kv_gib(tp: int, kv_cache_quant: str | None, blocks: int = 16) -> float:
    """A per-rank KV budget of `blocks` blocks (the tiny models: 2 layers, 2 KV heads of 16, float32): the 3
    prompts grow to 21 blocks, so the scheduler must preempt and resume."""
    value_bytes, scale_bytes = {None: (4, 0), "int8": (1, 2), "fp8": (1, 0)}[kv_cache_quant]
    per_token = 2 * 2 * (2 // tp) * (16 * value_bytes + scale_bytes)  # layers x (k, v) x heads x (values + scale)
    return blocks * KNOBS["block_size"] * per_token / 2**30


def _run(model, tensor_parallel_size: int = 1, **knobs) -> tuple[list[list[int]], torch.Tensor, int]:
    budget = _kv_gib(tensor_parallel_size, knobs.get("kv_cache_quant"))
    llm = LLM(str(model), tensor_parallel_size=tensor_parallel_size, kv_cache_memory=budget, **{**KNOBS, **knobs})
    try:
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        logits = llm.engine.prompt_logits(PROMPTS[2] * 2)
        return tokens, logits, llm.engine.scheduler.num_preemptions
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("arch", "knobs", "logit_tolerance"), [
    ("llama", {}, 1e-4),
    ("llama", {"quantization": "mxfp4", "kv_cache_quant": "int8"}, 1e-4),
    ("llama", {"kv_cache_quant": "fp8"}, 1e-4),
    # Per-token activation scales: a row-parallel rank takes the max over every rank's slice of the token.
    ("llama", {"quantization": "fp8-dynamic"}, 1e-4),
    ("gpt_oss", {}, 1e-4),
    ("gpt_oss", {"quantization": "mxfp4"}, 1e-4),
    # Expert parallel: each rank holds 2 of the 4 experts whole (reference loop, then the fused Triton kernel).
    ("gpt_oss", {"enable_expert_parallel": True}, 1e-4),
    ("gpt_oss", {"enable_expert_parallel": True, "quantization": "mxfp4", "kernel_backend": "triton"}, 1e-4),
])
def test_tp2_matches_tp1(tiny_model, arch, knobs, logit_tolerance):
    model = tiny_model(arch)
    tokens1, logits1, _ = _run(model, **knobs)
    tokens2, logits2, preemptions = _run(model, tensor_parallel_size=2, **knobs)
    assert tp_size() == 1 and not multiprocessing.active_children()  # the workers are gone
    assert preemptions > 0  # the small KV cache made the scheduler preempt and resume
    assert tokens2 == tokens1
    assert (logits1 - logits2).abs().max() < logit_tolerance


def test_tp2_speculates_with_ngram_drafts(tiny_model):
    """Verification chunks (a sequence's last token and its drafts) travel in the broadcast step like any other;
    the prompts repeat themselves, so prompt lookup proposes and some drafts are accepted."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    prompts = [p * 3 for p in PROMPTS]
    plain = LLM(str(tiny_model("llama")), kv_cache_memory=_kv_gib(1, None, 64), **KNOBS)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(str(tiny_model("llama")), tensor_parallel_size=2, kv_cache_memory=_kv_gib(2, None, 64),
              speculative_config=spec, **KNOBS)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want
        assert llm.engine.get_stats()["spec_decode_num_accepted_tokens"] > 0
    finally:
        llm.shutdown()


def test_tp2_loads_a_static_fp8_checkpoint(tiny_model, tmp_path):
    """Static FP8 is calibrated on one device, saved, then loaded split in two: scales are per tensor, so both
    give the same logits."""
    from microscale import CalibConfig
    from microscale.export import quantize_checkpoint

    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    source = tiny_model("llama")
    llm = LLM(str(source), dtype="float32", quantization="fp8", max_model_len=64,
              calib_config=CalibConfig(calib_dataset=str(text), calib_batches=2, calib_max_seq_length=64))
    checkpoint = quantize_checkpoint(source, tmp_path / "fp8", "fp8", llm.engine)
    tokens1, logits1, _ = _run(checkpoint)
    tokens2, logits2, _ = _run(checkpoint, tensor_parallel_size=2)
    assert tokens2 == tokens1 and (logits1 - logits2).abs().max() < 1e-4


@pytest.mark.parametrize(("arch", "tp", "message"), [  # 4 heads, 2 KV heads, intermediate 128 (gpt-oss: 64)
    ("llama", 3, r"4 attention heads; 2 KV heads \(need a multiple of 3, or a divisor of it to replicate them\); "
                 r"intermediate size 128\."),
    ("llama", 8, r"4 attention heads\."),  # 8 ranks could share 2 KV heads, but not 4 query heads
    ("gpt_oss", 4, r"an MXFP4 intermediate slice of 16 \(not a multiple of 32\)"),
])
def test_a_split_that_does_not_divide_fails_before_any_process_starts(tiny_model, arch, tp, message):
    quantization = "mxfp4" if arch == "gpt_oss" else None
    with pytest.raises(ValueError, match=f"tensor_parallel_size={tp} does not divide this model: {message}"):
        LLM(str(tiny_model(arch)), tensor_parallel_size=tp, quantization=quantization, kv_cache_memory=0.01, **KNOBS)
    assert not multiprocessing.active_children()


def test_calibration_is_refused_under_tensor_parallelism(tiny_model, tmp_path):
    from microscale import CalibConfig

    with pytest.raises(ValueError, match="calibrate with tensor_parallel_size=1"):
        LLM(str(tiny_model("llama")), quantization="fp8", tensor_parallel_size=2,
            calib_config=CalibConfig(calib_dataset=str(tmp_path / "x.txt")), kv_cache_memory=0.01, **KNOBS)


def test_a_dead_worker_ends_the_engine_with_a_clear_error(tiny_model):
    llm = LLM(str(tiny_model("llama")), tensor_parallel_size=2, kv_cache_memory=_kv_gib(2, None), **KNOBS)
    try:
        worker = llm.engine.executor.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(5)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"worker died \(rank 1 exited with code -9\)"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert time.monotonic() - started < 5
    finally:
        llm.shutdown()
    assert tp_size() == 1


def test_torchrun_ranks_serve_through_the_openai_server(tiny_model):
    model = str(tiny_model("llama"))
    port = free_port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
               str(free_port()), "-m", "microscale", "serve", model, "--tp", "2", "--port", str(port), "--dtype",
               "float32", "--max-model-len", "64", "--kv-cache-memory", "0.01"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the torchrun server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        # Served as its folder's name (the path would leak the server's layout).
        served = client.completions.create(model=os.path.basename(model), prompt="def add(a, b):", max_tokens=8,
                                           temperature=0)
        llm = LLM(model, dtype="float32", max_model_len=64, kv_cache_memory=0.01)
        offline = llm.generate("def add(a, b):", SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        assert served.choices[0].text == offline[0].outputs[0].text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_server_health_fails_when_a_worker_dies(tiny_model):
    """`serve --tp 2`: the engine process starts the worker; killing it turns /health and requests into 503."""
    from fastapi.testclient import TestClient

    from microscale.config import EngineArgs
    from microscale.serve.app import build_app
    from microscale.serve.async_engine import AsyncEngine

    engine = AsyncEngine(EngineArgs(model=str(tiny_model("llama")), tensor_parallel_size=2,
                                    kv_cache_memory=_kv_gib(2, None), **KNOBS))
    engine.start()
    with TestClient(build_app(engine)) as client:
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        with open(f"/proc/{engine.process.pid}/task/{engine.process.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        workers = [pid for pid in children if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 503
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "failed"}
        assert "rank 1 exited with code -9" in engine.error  # for the log, not for clients


@pytest.mark.parametrize("quantization", [None, "mxfp4"])
def test_each_rank_reads_only_its_slices_of_the_checkpoint(tiny_model, caplog, quantization):
    """Sharded weights are read from safetensors as this rank's slice (norms, whole, are a tiny part)."""
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="microscale.models.loader"):
        LLM(str(tiny_model("llama")), tensor_parallel_size=2, quantization=quantization,
            kv_cache_memory=_kv_gib(2, None), **KNOBS).shutdown()
    message = next(r.getMessage() for r in caplog.records if "MiB of checkpoint" in r.getMessage())
    read, total = (float(x) for x in re.findall(r"\d+\.\d+", message))
    assert 0.45 * total < read < 0.55 * total, message
