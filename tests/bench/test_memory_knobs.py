"""The bench gives each engine the same memory setting: gpu_memory_utilization (vLLM's meaning, a share of the
GPU's total memory) goes to microscale and vLLM alike; cache_max_entry_count is microscale's own and never
reaches vLLM, whose result says what it ran with. vLLM is a stub package here (the real worker script runs)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import microscale.llm
from microscale.bench.config import load_config
from microscale.bench.datasets import BenchRequest
from microscale.bench.throughput import run_throughput

REQUESTS = [BenchRequest([5, 6, 7], 2), BenchRequest([8, 9], 3)]

STUB_VLLM = '''
import json
import os
from types import SimpleNamespace

__version__ = "stub"


class SamplingParams:
    def __init__(self, max_tokens, **kwargs):
        self.max_tokens = max_tokens


class LLM:
    def __init__(self, model, gpu_memory_utilization=0.9, **kwargs):
        if gpu_memory_utilization != 0.9:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        with open(os.environ["STUB_VLLM_KWARGS"], "w") as f:
            json.dump(kwargs, f)

    def generate(self, prompts, params, use_tqdm=True):
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1] * p.max_tokens)]) for p in params]
'''


class Built(Exception):
    pass


def _microscale_kwargs(monkeypatch, config) -> dict:
    def fake_llm(model, **kwargs):
        raise Built(kwargs)

    monkeypatch.setattr(microscale.llm, "LLM", fake_llm)
    with pytest.raises(Built) as built:
        run_throughput(config, REQUESTS)
    return built.value.args[0]


def _run_stub_vllm(monkeypatch, tmp_path, config) -> tuple[dict, dict]:
    """(the keywords vllm.LLM got, the run's result)."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(textwrap.dedent(STUB_VLLM))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("STUB_VLLM_KWARGS", str(tmp_path / "kwargs.json"))
    run = run_throughput(config, REQUESTS)
    return json.loads((tmp_path / "kwargs.json").read_text()), run


def test_gpu_memory_utilization_reaches_both_engines(monkeypatch, tmp_path):
    engine = {"gpu_memory_utilization": 0.7, "cache_max_entry_count": 0.5, "vllm_python": sys.executable}
    config = load_config(None, {"engine": engine})
    ours = _microscale_kwargs(monkeypatch, config)
    assert ours["gpu_memory_utilization"] == 0.7 and ours["cache_max_entry_count"] == 0.5

    config.engine.backend = "vllm"
    theirs, run = _run_stub_vllm(monkeypatch, tmp_path, config)
    assert theirs["gpu_memory_utilization"] == 0.7 and run["vllm_gpu_memory_utilization"] == 0.7
    assert run["output_tokens"] == 5


def test_cache_max_entry_count_stays_with_microscale_and_vllm_says_it_ran_its_default(monkeypatch, tmp_path):
    config = load_config(None, {"engine": {"cache_max_entry_count": 0.6, "vllm_python": sys.executable}})
    ours = _microscale_kwargs(monkeypatch, config)
    assert ours["gpu_memory_utilization"] is None and ours["cache_max_entry_count"] == 0.6

    config.engine.backend = "vllm"
    theirs, run = _run_stub_vllm(monkeypatch, tmp_path, config)
    assert "gpu_memory_utilization" not in theirs  # a share of free memory means something else to vLLM
    assert run["vllm_gpu_memory_utilization"] == 0.9  # the stub's default, read from vllm.LLM's signature
