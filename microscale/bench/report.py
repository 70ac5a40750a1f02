"""What a benchmark run reports: per-request timings summarised into throughput and latency percentiles, the
environment it ran in, a table on the terminal and a JSON file.

JSON layout (one file per command): {"kind": "throughput" | "serve", "label", "settings", "environment",
"runs": [result, ...]} where each result holds requests_per_s, input/output/total_tokens_per_s and
ttft_ms / tpot_ms / itl_ms / e2e_ms as {"mean", "p50", "p90", "p99"} (null when the backend cannot see them).
microscale's runs add "roofline" (RooflineTotals.summary: decode, mixed and all steps' GB/s, TFLOP/s, their
shares of the peaks (0..1) and speed of light), "device_peaks" (the device and its measured peaks) and
"prefix_cache_hit_rate".
A sweep has one run per concurrency."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    """One request as the benchmark saw it; times in seconds from the request's start."""

    prompt_tokens: int
    output_tokens: int
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)  # gaps between successive token arrivals
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's definition)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def summarize(values: list[float]) -> dict[str, float] | None:
    """Mean and percentiles in milliseconds (linear interpolation, as numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    out = {"mean": 1000 * statistics.fmean(ordered)}
    for p in PERCENTILES:
        rank = (len(ordered) - 1) * p / 100
        lo = int(rank)
        hi = min(lo + 1, len(ordered) - 1)
        out[f"p{p}"] = 1000 * (ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))
    return {k: round(v, 3) for k, v in out.items()}


def summarize_run(timings: list[RequestTiming], duration_s: float, **extra: Any) -> dict[str, Any]:
    """Throughput over the run's wall time and latency percentiles over the requests that completed."""
    done = [t for t in timings if t.error is None]
    input_tokens = sum(t.prompt_tokens for t in done)
    output_tokens = sum(t.output_tokens for t in done)
    errors = [t.error for t in timings if t.error is not None]
    return {
        **extra,
        "num_requests": len(timings),
        "completed": len(done),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "duration_s": round(duration_s, 4),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": round(len(done) / duration_s, 4),
        "input_tokens_per_s": round(input_tokens / duration_s, 3),
        "output_tokens_per_s": round(output_tokens / duration_s, 3),
        "total_tokens_per_s": round((input_tokens + output_tokens) / duration_s, 3),
        "ttft_ms": summarize([t.ttft for t in done if t.ttft is not None]),
        "tpot_ms": summarize([t.tpot for t in done if t.tpot is not None]),
        "itl_ms": summarize([gap for t in done for gap in t.itls]),
        "e2e_ms": summarize([t.e2e for t in done if t.e2e is not None]),
    }


def peak_memory_gib(device: str | None = None) -> dict[str, float]:
    """Peak memory of this process: host RSS, and the accelerator's allocator peak when one was used."""
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"host_rss_gib": round(rss / 2**30, 3)}
    if device is not None and device.startswith("cuda"):
        import torch

        out["device_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def environment() -> dict[str, Any]:
    """Versions and hardware, so that two JSON files say whether they are comparable."""
    import torch

    from microscale.version import __version__

    versions = {"microscale": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "versions": versions,
        "device": "cuda" if gpu else "cpu",
        "gpu": gpu,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: str | Path, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable bench JSON file: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("runs"), list):
        raise ValueError(f"{path} is not a `microscale bench` JSON result (no 'runs' list).")
    return record


def print_table(record: dict[str, Any], title: str | None = None) -> None:
    """One row per run: throughput and the latency percentiles."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or f"microscale bench {record['kind']}: {record['label']}")
    columns = ["run", "req/s", "in tok/s", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "ITL p50/p99 ms",
               "E2E p50/p99 ms", "ok/total"]
    for name in columns:
        table.add_column(name, justify="right" if name != "run" else "left")
    for run in record["runs"]:
        table.add_row(
            run_label(run), f"{run['requests_per_s']:.2f}", f"{run['input_tokens_per_s']:.1f}",
            f"{run['output_tokens_per_s']:.1f}", *(_pair(run[k]) for k in LATENCY_KEYS),
            f"{run['completed']}/{run['num_requests']}",
        )
    console = Console(width=160)  # wide enough for every column, on a terminal or in a log
    console.print(table)
    for run in record["runs"]:
        if run.get("roofline") is not None:
            console.print(f"{run_label(run)}: {roofline_line(run)}")
        spec = run.get("speculative_decoding")
        if spec and spec["acceptance_rate"] is not None:
            console.print(f"{run_label(run)}: speculative decoding ({spec['method']}, k = "
                          f"{spec['num_speculative_tokens']}): {spec['acceptance_rate']:.1%} of drafts accepted, "
                          f"mean accepted length {spec['mean_accepted_length']}")


def roofline_line(run: dict[str, Any]) -> str:
    """The run's achieved bandwidth and compute by kind of step against the device's measured peaks, and its
    prefix-cache hit rate: what two reports must agree on to be compared."""
    parts = [f"{kind} steps {r['gb_per_s']:.3g} GB/s ({r['bandwidth_of_peak']:.1%} of peak), "
             f"{r['tflop_per_s']:.3g} TFLOP/s ({r['compute_of_peak']:.1%})"
             for kind, r in run["roofline"].items() if kind != "all"]
    total = run["roofline"].get("all")
    if total is not None:
        parts.append(f"speed of light {total['speed_of_light']:.1%}")
    hit_rate = run.get("prefix_cache_hit_rate")
    parts.append(f"prefix cache hit rate {'-' if hit_rate is None else format(hit_rate, '.1%')}")
    peaks = run["device_peaks"]
    return (f"{'; '.join(parts)}. Device {peaks['device']}: measured peaks {peaks['bytes_per_s'] / 1e9:.3g} GB/s, "
            f"{peaks['flops_per_s'] / 1e12:.3g} TFLOP/s")


def run_label(run: dict[str, Any]) -> str:
    if "backend" in run:
        return f"{run['backend']} (batch {run['max_concurrency']})"
    if run.get("request_rate") is not None:
        return f"rate {run['request_rate']}/s"
    if run.get("max_concurrency") is not None:
        return f"concurrency {run['max_concurrency']}"
    return "all at once"


def _pair(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['p50']:.1f} / {stats['p99']:.1f}"
