"""The seed's four figures of a serving engine, each beside its target: device utilisation, batching efficiency,
achieved memory bandwidth and per-token latency (the inter-token latency histogram, in metrics.py), plus the
energy per output token where NVML reads the GPU's energy counter.

Averaged over the step reports of the last WINDOW_S seconds (one step says little) and computed when /metrics is
scraped, so an idle engine's figures fall away instead of keeping their last busy values. Fractions are 0..1,
as kv_cache_usage_perc's.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # types only: `microscale monitor` imports the targets from here without torch
    from microscale.engine.device_peaks import DevicePeaks
    from microscale.engine.roofline import StepCost

WINDOW_S = 10.0
_ENERGY_PERIOD_S = 1.0  # NVML's energy counter is read at most this often


@dataclass(frozen=True)
class Target:
    """A figure's target band (either bound may be open). Within it: green; within a quarter of a bound beyond
    it: yellow; further: red."""

    text: str
    low: float | None = None
    high: float | None = None

    def grade(self, value: float) -> str:
        if (self.low is None or value >= self.low) and (self.high is None or value <= self.high):
            return "green"
        near_low = self.low is None or value >= 0.75 * self.low
        near_high = self.high is None or value <= 1.25 * self.high
        return "yellow" if near_low and near_high else "red"


# The seed's targets. Its bandwidth target is "an H800 should exceed 2 TB/s": 2 of the H800's 3.35 TB/s datasheet
# peak, about 60%, which is the share of this device's measured peak asked of every device here.
BANDWIDTH_TARGET_NOTE = "the seed's > 2 TB/s on an H800, of its 3.35 TB/s peak"
TARGETS = {
    "utilization": Target("85-95%", low=0.85, high=0.95),
    "batching": Target("> 90%", low=0.90),
    "bandwidth": Target("> 60% of peak", low=0.60),
    "latency": Target("< 15 ms", high=0.015),
}


class Nvml:
    """Utilisation and energy of the GPUs the engine runs on, through NVML (pynvml, when installed)."""

    def __init__(self, nvml: Any, handles: list[Any]) -> None:
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls, indices: list[int], nvml: ModuleType | Any | None = None) -> Nvml | None:
        """NVML on these device indices; None without pynvml, a driver, or the devices."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return None
        try:
            nvml.nvmlInit()
            return cls(nvml, [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices])
        except Exception:  # pynvml's NVMLError: no driver, no such device
            return None

    def utilization(self) -> float | None:
        """The devices' mean busy fraction over NVML's last sample period."""
        try:
            return sum(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles) / 100 / len(self.handles)
        except Exception:
            return None

    def energy_joules(self) -> float | None:
        """Energy the devices drew since their driver loaded (Volta and later: None before)."""
        try:
            return sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1000
        except Exception:
            return None


def gpu_indices(device: str | None, tensor_parallel_size: int) -> list[int]:
    """NVML's indices of the engine's GPUs (rank r on cuda:r), through CUDA_VISIBLE_DEVICES; [] when on CPU."""
    if device is not None and not device.startswith("cuda"):
        return []
    if device is None:
        import torch

        if not torch.cuda.is_available():
            return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    order = [int(v) for v in visible.split(",")] if visible and all(
        v.strip().isdigit() for v in visible.split(",")) else None
    return [order[r] if order and r < len(order) else r for r in range(tensor_parallel_size)]


@dataclass(frozen=True)
class _Step:
    at: float  # when its report arrived
    seconds: float
    tokens: int
    running: float  # requests running after it
    cost: StepCost | None


class SeedFigures(Collector):
    """Step reports of the last WINDOW_S seconds, and the figures they give, as Prometheus gauges."""

    def __init__(self, model_name: str, max_num_seqs: int, max_num_batched_tokens: int, nvml: Nvml | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model_name, self.max_num_seqs, self.token_budget = model_name, max_num_seqs, max_num_batched_tokens
        self.nvml, self.clock = nvml, clock
        self.peaks: DevicePeaks | None = None
        self._steps: deque[_Step] = deque()
        self._energy: deque[tuple[float, float, float]] = deque()  # (time, joules, generation tokens so far)
        self._since = clock()
        self._lock = threading.Lock()  # records come from the reader thread, scrapes from the server's

    def new_engine(self, peaks: DevicePeaks | None) -> None:
        with self._lock:
            self.peaks = peaks
            self._steps.clear()
            self._energy.clear()
            self._since = self.clock()

    def record(self, seconds: float, tokens: int, cost: StepCost | None, stats: dict[str, float]) -> None:
        now = self.clock()
        energy = None
        if self.nvml is not None and (not self._energy or now - self._energy[-1][0] >= _ENERGY_PERIOD_S):
            energy = self.nvml.energy_joules()
        with self._lock:
            self._steps.append(_Step(now, seconds, tokens, stats["num_requests_running"], cost))
            if energy is not None:
                self._energy.append((now, energy, stats["generation_tokens"]))
            self._prune(now)

    def _prune(self, now: float) -> None:
        while self._steps and self._steps[0].at < now - WINDOW_S:
            self._steps.popleft()
        while self._energy and self._energy[0][0] < now - WINDOW_S:
            self._energy.popleft()

    def figures(self) -> dict[str, Any]:
        """The window's figures (a key is missing when nothing in the window measured it)."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            steps, energy, since = list(self._steps), list(self._energy), self._since
        out: dict[str, Any] = {}
        span = min(WINDOW_S, now - since)
        if span > 0:
            busy = sum(min(s.seconds, s.at - (now - WINDOW_S)) for s in steps)  # the part inside the window
            out["engine_loop_busy"] = min(1.0, busy / span)
        if self.nvml is not None and (used := self.nvml.utilization()) is not None:
            out["nvml_utilization"] = used
        if steps:
            out["token_efficiency"] = sum(s.tokens for s in steps) / (len(steps) * self.token_budget)
            out["seq_occupancy"] = sum(s.running for s in steps) / (len(steps) * self.max_num_seqs)
        for kind in ("decode", "mixed"):
            timed = [s for s in steps if s.cost is not None and s.cost.decode_only == (kind == "decode")]
            seconds = sum(s.seconds for s in timed)
            if seconds > 0:
                out[f"bandwidth_{kind}"] = sum(s.cost.bytes for s in timed) / seconds
        if len(energy) > 1 and energy[-1][2] > energy[0][2]:
            out["joules_per_token"] = (energy[-1][1] - energy[0][1]) / (energy[-1][2] - energy[0][2])
        return out

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = self.figures()
        name = self.model_name

        def gauge(metric: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"microscale:{metric}", doc, labels=["model_name", *labels])

        window = f" over the last {WINDOW_S:g}s of steps"
        utilization = gauge("device_utilization_perc", "Device busy fraction (0..1): source nvml is the GPU's own, "
                            f"engine_loop the time inside engine steps over wall time{window}. Target "
                            f"{TARGETS['utilization'].text}.", ("source",))
        for source, key in (("nvml", "nvml_utilization"), ("engine_loop", "engine_loop_busy")):
            if key in figures:
                utilization.add_metric([name, source], figures[key])
        yield utilization
        batching = f"{window}. Target {TARGETS['batching'].text}."
        for metric, key, doc in (
            ("batching_token_efficiency_perc", "token_efficiency",
             "Tokens scheduled per step over the step's token budget (max_num_batched_tokens)"),
            ("batching_seq_occupancy_perc", "seq_occupancy", "Requests running per step over max_num_seqs"),
        ):
            family = gauge(metric, doc + batching)
            if key in figures:
                family.add_metric([name], figures[key])
            yield family
        bandwidth = gauge("achieved_memory_bandwidth_bytes_per_second", "Bytes the steps had to move (weights, KV "
                          "cache, activations) over their time, decode-only and mixed steps apart" + window + ".",
                          ("step",))
        share = gauge("memory_bandwidth_peak_perc", "Achieved memory bandwidth over the device's measured peak "
                      f"(0..1){window}. Target {TARGETS['bandwidth'].text} ({BANDWIDTH_TARGET_NOTE}).", ("step",))
        for kind in ("decode", "mixed"):
            if (value := figures.get(f"bandwidth_{kind}")) is not None:
                bandwidth.add_metric([name, kind], value)
                if self.peaks is not None:
                    share.add_metric([name, kind], value / self.peaks.bytes_per_s)
        yield bandwidth
        yield share
        if self.peaks is not None:
            peak = gauge("device_peak_memory_bandwidth_bytes_per_second",
                         f"The device's copy bandwidth, measured at start-up ({self.peaks.device}).")
            peak.add_metric([name], self.peaks.bytes_per_s)
            yield peak
        if self.nvml is not None:
            energy = gauge("energy_per_output_token_joules", "Energy the GPUs drew (NVML) per output token generated"
                           + window + ".")
            if "joules_per_token" in figures:
                energy.add_metric([name], figures["joules_per_token"])
            yield energy
