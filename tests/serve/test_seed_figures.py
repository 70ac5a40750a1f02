"""The seed's figures from step reports, on an injected clock: the window's averages, the engine loop's busy
fraction falling away when idle, bandwidth over the measured peak, and NVML's utilisation and energy per output
token through a fake NVML."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from microscale.engine.device_peaks import DevicePeaks
from microscale.engine.roofline import StepCost
from microscale.serve.messages import StepReport
from microscale.serve.metrics import ServerMetrics
from microscale.serve.seed_figures import TARGETS, WINDOW_S, Nvml, gpu_indices

P = "microscale:"


class FakeNvml:
    """pynvml's calls the figures make: two GPUs, busy 80% and 100%, each drawing 150 J per second of the clock."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=80 + 20 * handle)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return round(150_000 * self.clock[0])  # millijoules


def cost(tokens: int, decode: bool, gigabytes: float) -> StepCost:
    return StepCost(tokens, tokens, decode, gigabytes * 1e9, 0, 0, 0, 1e9)


def report(seconds: float, tokens: int, running: int, generated: int, step_cost: StepCost) -> StepReport:
    stats = {"num_requests_running": running, "num_requests_waiting": 0, "kv_cache_usage": 0.5,
             "generation_tokens": generated, **dict.fromkeys(("prompt_tokens", "num_preemptions",
             "prefix_cache_queries", "prefix_cache_hits", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
             "spec_decode_num_accepted_tokens"), 0)}
    return StepReport([], stats, seconds, tokens, step_cost)


def test_figures_over_the_window_with_a_fake_nvml():
    now = [100.0]
    metrics = ServerMetrics(128, "m", max_num_seqs=8, max_num_batched_tokens=64,
                            nvml=Nvml.open([0, 1], FakeNvml(now)), clock=lambda: now[0])
    metrics.new_engine({}, DevicePeaks("dev", 100e9, 1e12))
    # Two seconds: a mixed step (64 tokens, 4 running) and three decode steps of 4 tokens, 0.25 s each.
    steps = [(0.5, cost(64, False, 20.0), 4, 4), *[(0.25, cost(4, True, 15.0), 4, 8 + 4 * i) for i in range(3)]]
    for seconds, step_cost, running, generated in steps:
        now[0] += 0.5
        metrics.record_report(report(seconds, step_cost.tokens, running, generated, step_cost))
    text = metrics.render().decode()
    sample = metrics.registry.get_sample_value

    def value(metric: str, **labels: str) -> float | None:
        return sample(P + metric, {"model_name": "m", **labels})

    assert value("device_utilization_perc", source="engine_loop") == pytest.approx(1.25 / 2)
    assert value("device_utilization_perc", source="nvml") == pytest.approx(0.9)
    assert value("batching_token_efficiency_perc") == pytest.approx((64 + 12) / (4 * 64))
    assert value("batching_seq_occupancy_perc") == pytest.approx(0.5)
    assert value("achieved_memory_bandwidth_bytes_per_second", step="mixed") == pytest.approx(40e9)
    assert value("achieved_memory_bandwidth_bytes_per_second", step="decode") == pytest.approx(60e9)
    assert value("memory_bandwidth_peak_perc", step="decode") == pytest.approx(0.6)
    # Energy read once a second: at 100.5 (4 tokens) and 101.5 (12 tokens): two GPUs' 300 J over 8 tokens.
    assert value("energy_per_output_token_joules") == pytest.approx(300 / 8)
    assert "Target 85-95%" in text and "model_name=\"m\"" in text
    # Idle for a whole window: the step averages have nothing left to say and the loop is not busy.
    now[0] += WINDOW_S + 1
    assert value("device_utilization_perc", source="engine_loop") == 0
    assert value("batching_token_efficiency_perc") is None and value("energy_per_output_token_joules") is None
    assert value("achieved_memory_bandwidth_bytes_per_second", step="decode") is None


def test_without_nvml_or_on_cpu(monkeypatch):
    assert Nvml.open([0], SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("no driver")))) is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_indices("cpu", 2) == [] and gpu_indices("cuda", 2) == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_indices("cuda", 2) == [3, 5]
    metrics = ServerMetrics(128, "m")
    assert "energy_per_output_token" not in metrics.render().decode()


def test_targets_grade_green_yellow_red():
    assert [TARGETS["utilization"].grade(v) for v in (0.9, 0.97, 0.7, 0.5)] == ["green", "yellow", "yellow", "red"]
    assert [TARGETS["latency"].grade(v) for v in (0.010, 0.017, 0.030)] == ["green", "yellow", "red"]
    assert [TARGETS["bandwidth"].grade(v) for v in (0.65, 0.5, 0.2)] == ["green", "yellow", "red"]
