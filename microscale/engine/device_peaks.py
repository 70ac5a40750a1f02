"""A device's peak memory bandwidth and bf16 matmul throughput: the denominators of "% of peak".

Measured once per device (a large device-to-device copy and a large bf16 matmul, about a second) and cached on
disk under the user cache dir, except a CPU's figures measured while other processes kept its cores busy (they
read a fraction of the truth, and a cached figure would stand for good). The datasheet figures of common GPUs
sit beside them as a cross-check (and give the planner a GPU's memory by name)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from microscale.cache_dir import microscale_cache_dir

logger = logging.getLogger(__name__)

_GIB = 1 << 30


@dataclass(frozen=True)
class Datasheet:
    """Vendor figures: memory as torch reports it (GiB, about), HBM/GDDR bandwidth, dense bf16 tensor FLOP/s."""

    memory_gib: float
    bytes_per_s: float
    flops_per_s: float


# SXM parts where there are two; dense (no 2:4 sparsity) bf16.
DATASHEETS: dict[str, Datasheet] = {
    "H100": Datasheet(79.2, 3.35e12, 989e12),
    "H200": Datasheet(139.8, 4.8e12, 989e12),
    "H800": Datasheet(79.2, 3.35e12, 989e12),
    "A100": Datasheet(79.2, 2.039e12, 312e12),
    "L40S": Datasheet(44.5, 0.864e12, 362e12),
    "L4": Datasheet(22.0, 0.3e12, 121e12),
    "B200": Datasheet(178.4, 8.0e12, 2250e12),
}


def datasheet_for(device_name: str) -> tuple[str, Datasheet] | None:
    """The table entry a device name ("NVIDIA H100 80GB HBM3", "h200") names as a whole word, if any."""
    for key, sheet in DATASHEETS.items():
        if re.search(rf"(?<![A-Za-z0-9]){key}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
            return key, sheet
    return None


@dataclass(frozen=True)
class DevicePeaks:
    device: str  # the device's name (a CPU: its model and the threads torch uses)
    bytes_per_s: float  # measured copy bandwidth (bytes read + written per second)
    flops_per_s: float  # measured bf16 matmul FLOP/s
    datasheet: Datasheet | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def _cache_file() -> Path:
    return microscale_cache_dir() / "device_peaks.json"


def _timed(fn: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
    """Seconds per call, best of `repeats` after a warm-up (the best run is the closest to the hardware's peak)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: torch.device, copy_bytes: int | None = None, matmul_n: int | None = None) -> DevicePeaks:
    """Copy `copy_bytes` (counted twice: read and written) and multiply two bf16 n x n matrices (2 n^3 FLOPs)."""
    gpu = device.type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if gpu else 1 << 27)
    n = matmul_n or (8192 if gpu else 1024)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    source = torch.ones(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = _timed(lambda: target.copy_(source), sync, 5)
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    matmul_s = _timed(lambda: torch.mm(a, b), sync, 5)
    name = device_name(device)
    found = datasheet_for(name) if gpu else None
    return DevicePeaks(name, 2 * copy_bytes / copy_s, 2 * n**3 / matmul_s, found[1] if found else None)


def busy_reason(device: torch.device) -> str | None:
    """Why a CPU measurement just taken cannot stand for the machine (more runnable tasks than cores, on the
    last minute's average), or None."""
    if device.type != "cpu":
        return None
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    return f"the machine was busy (load average {load:.1f} on {cores} cores)" if load > cores else None


def device_peaks(device: torch.device, measure: Callable[[torch.device], DevicePeaks] = measure_peaks) -> DevicePeaks:
    """This device's peaks: from the disk cache, else measured now (and cached)."""
    name = device_name(device)
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(name)
    if isinstance(entry, dict) and entry.get("bytes_per_s") and entry.get("flops_per_s"):
        found = datasheet_for(name) if device.type == "cuda" else None
        return DevicePeaks(name, float(entry["bytes_per_s"]), float(entry["flops_per_s"]),
                           found[1] if found else None)
    started = time.perf_counter()
    peaks = measure(device)
    logger.info("measured %s in %.1fs: %.1f GB/s copy, %.1f TFLOP/s bf16 matmul%s", name,
                time.perf_counter() - started, peaks.bytes_per_s / 1e9, peaks.flops_per_s / 1e12,
                "" if peaks.datasheet is None else f" (datasheet {peaks.datasheet.bytes_per_s / 1e9:.0f} GB/s, "
                f"{peaks.datasheet.flops_per_s / 1e12:.0f} TFLOP/s)")
    busy = busy_reason(device)
    if busy is not None:
        logger.warning("not caching %s's peaks: %s; measured again at the next start", name, busy)
        return peaks
    cached[name] = {"bytes_per_s": peaks.bytes_per_s, "flops_per_s": peaks.flops_per_s}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)  # atomic: engines starting together never read half a file
    except OSError as e:
        logger.warning("could not cache device peaks in %s: %s", path, e)
    return peaks
