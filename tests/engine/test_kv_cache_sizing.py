"""KV cache sizing on a GPU, checked on a CPU: the arithmetic of both fractions (cache_max_entry_count, LMDeploy's
share of free memory; gpu_memory_utilization, vLLM's share of the total), and the profiling around it, with
torch.cuda's memory functions replaced by a scripted fake while a tiny model's profiled step really runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from microscale.config import EngineArgs
from microscale.engine import shard
from microscale.engine.inputs import InputProcessor
from microscale.engine.sampler import Sampler
from microscale.engine.shard import GpuMemory, GpuSnapshot, build_shard, kv_cache_budget

GIB = 1 << 30
CUDA = torch.device("cuda")
# An 80 GiB GPU on which others hold 1 GiB; the shard loads 16 GiB of weights, and its step peaks 4 GiB above them.
MEM = GpuMemory(total=80 * GIB, free_at_start=79 * GIB, free=62 * GIB, weights=16 * GIB, peak_activation=4 * GIB,
                non_torch=GIB)


def test_cache_max_entry_count_is_a_share_of_what_weights_and_activations_leave_free():
    assert kv_cache_budget(MEM, 0.5, None) == (62 - 4) * GIB // 2
    assert kv_cache_budget(MEM, 1.0, None) == 58 * GIB  # the activations stay reserved even at 1.0


def test_gpu_memory_utilization_is_a_share_of_the_total_for_the_whole_engine():
    # 0.9 of 80 GiB for the engine: weights, peak activations and non-torch memory come out of it, not what
    # other processes hold; cache_max_entry_count no longer matters.
    assert kv_cache_budget(MEM, 0.5, 0.9) == 72 * GIB - (16 + 4 + 1) * GIB
    assert kv_cache_budget(MEM, 0.1, 0.9) == kv_cache_budget(MEM, 0.8, 0.9)
    assert kv_cache_budget(MEM, 0.5, 0.25) == 0  # 20 GiB asked, 21 GiB already taken: nothing, not negative


def test_gpu_memory_utilization_over_what_others_left_free_is_refused():
    busy = dataclasses.replace(MEM, free_at_start=60 * GIB)
    assert kv_cache_budget(busy, 0.8, 0.75) == 60 * GIB - 21 * GIB
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.9 asks for 72.00 GiB .* only 60.00 GiB"):
        kv_cache_budget(busy, 0.8, 0.9)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_gpu_memory_utilization_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineArgs(model="m", gpu_memory_utilization=value)


class FakeCuda:
    """torch.cuda's memory functions over scripted numbers; `calls` lists them (and the profiled forward and
    sampler) in order. A step's activations stay cached by torch until empty_cache hands them back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list = []
        self.total, self.free, self.allocated, self.reserved, self.peak, self.cached = 80 * GIB, 79 * GIB, 0, 0, 0, 0
        for name in ("mem_get_info", "memory_allocated", "memory_reserved", "max_memory_allocated",
                     "reset_peak_memory_stats", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def load(self, weights: int, non_torch: int) -> None:
        self.allocated += weights
        self.reserved += weights
        self.free -= weights + non_torch

    def run_step(self, activation: int) -> None:
        self.peak = max(self.peak, self.allocated + activation)
        self.reserved += activation
        self.cached += activation
        self.free -= activation

    def mem_get_info(self, device=None):
        self.calls.append("mem_get_info")
        return self.free, self.total

    def memory_allocated(self, device=None):
        self.calls.append("memory_allocated")
        return self.allocated

    def memory_reserved(self, device=None):
        self.calls.append("memory_reserved")
        return self.reserved

    def max_memory_allocated(self, device=None):
        self.calls.append("max_memory_allocated")
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.calls.append("reset_peak_memory_stats")
        self.peak = self.allocated

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.free += self.cached
        self.reserved -= self.cached
        self.cached = 0


@pytest.fixture(scope="module")
def cpu_args(tiny_model):
    return EngineArgs(model=str(tiny_model()), dtype="float32", max_model_len=16, max_num_seqs=3,
                      max_num_batched_tokens=40, kv_cache_memory=0.001, device="cpu")


def _cpu_runner(args: EngineArgs):
    return build_shard(args, InputProcessor(args), torch.device("cpu")).runner


def _record_step(monkeypatch, runner, fake: FakeCuda, activation: int) -> None:
    """The profiled forward and sampler run for real on the CPU runner; the fake sees the step's activations."""
    forward = runner.forward_logits

    def recorded(step):
        fake.calls.append(("forward", len(step.input_ids), [n for n, _, _ in step.prefills], step.rows))
        fake.run_step(activation)
        return forward(step)

    sample = Sampler.__call__

    def recorded_sample(self, logits, batch):
        fake.calls.append(("sample", tuple(logits.shape), batch.top_k is not None and batch.top_p is not None))
        return sample(self, logits, batch)

    monkeypatch.setattr(runner, "forward_logits", recorded)
    monkeypatch.setattr(Sampler, "__call__", recorded_sample)


@pytest.mark.parametrize("utilization", [None, 0.9])
def test_the_kv_cache_is_sized_after_a_profiled_step_at_the_token_budget(monkeypatch, cpu_args, utilization):
    runner = _cpu_runner(cpu_args)
    fake = FakeCuda(monkeypatch)
    start = GpuSnapshot.take(CUDA)  # 1 GiB held by others
    fake.load(weights=16 * GIB, non_torch=GIB // 2)  # and a CUDA/NCCL workspace of this process
    fake.calls.clear()
    _record_step(monkeypatch, runner, fake, activation=4 * GIB)
    args = dataclasses.replace(cpu_args, kv_cache_memory=None, cache_max_entry_count=0.5,
                               gpu_memory_utilization=utilization)

    num_blocks = shard._num_kv_blocks(args, runner, CUDA, 16, start)

    # 40 tokens (max_num_batched_tokens) in chunks of max_model_len, logits of max_num_seqs rows sampled
    # through top-k/top-p; the peak read after it, the cache emptied before the free memory is read.
    assert fake.calls == [
        "reset_peak_memory_stats", "memory_allocated",
        ("forward", 40, [16, 16, 8], [37, 38, 39]),
        ("sample", (3, runner.config.vocab_size), True),
        "max_memory_allocated", "empty_cache", "mem_get_info", "memory_allocated", "memory_reserved",
    ]
    expected = GpuMemory(total=80 * GIB, free_at_start=79 * GIB, free=62.5 * GIB, weights=16 * GIB,
                         peak_activation=4 * GIB, non_torch=GIB // 2)
    budget = kv_cache_budget(expected, 0.5, utilization)
    assert budget == ((62.5 - 4) * GIB // 2 if utilization is None else 72 * GIB - 20.5 * GIB)
    assert num_blocks == budget // runner.kv_block_bytes(args.block_size)


def test_a_step_holds_no_more_than_max_num_seqs_sequences_of_max_model_len(monkeypatch, cpu_args):
    runner = _cpu_runner(cpu_args)
    fake = FakeCuda(monkeypatch)
    start = GpuSnapshot.take(CUDA)
    _record_step(monkeypatch, runner, fake, activation=GIB)
    args = dataclasses.replace(cpu_args, kv_cache_memory=None, max_num_batched_tokens=1000)
    shard._num_kv_blocks(args, runner, CUDA, 16, start)
    (forward,) = [c for c in fake.calls if c[0] == "forward"]
    assert forward[1:3] == (48, [16, 16, 16])


def test_the_cpu_never_profiles(monkeypatch, cpu_args):
    """The CPU path as before: kv_cache_memory GiB, else the CPU default; no torch.cuda call, no profiled step."""

    def refuse(*args, **kwargs):
        raise AssertionError("touched on a CPU")

    for name in ("mem_get_info", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(shard.ModelRunner, "profile_step", refuse)
    default = build_shard(dataclasses.replace(cpu_args, kv_cache_memory=None), InputProcessor(cpu_args),
                          torch.device("cpu"))
    assert default.num_blocks == cpu_args.max_num_seqs * 1  # every sequence slot: one 16-token block each
    sized = build_shard(cpu_args, InputProcessor(cpu_args), torch.device("cpu"))
    assert sized.num_blocks == int(0.001 * GIB // sized.runner.kv_block_bytes(cpu_args.block_size))
