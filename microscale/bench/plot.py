"""Charts of `microscale bench` results (matplotlib, imported only here).

A sweep (several runs in one result) becomes lines against concurrency (or request rate): output tokens/s,
TTFT p50 and TPOT p50. Single-run results (e.g. microscale vs transformers vs a quantized model) become bars
of output tokens/s and E2E p50, one bar per result, with the ratio to the first result written on each bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot_results(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write one PNG comparing the given bench results; returns its path."""
    if not records:
        raise ValueError("nothing to plot: no results given.")
    plt = _pyplot()
    sweep = any(len(r["runs"]) > 1 for r in records)
    fig = _sweep_figure(plt, records) if sweep else _bar_figure(plt, records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _x(run: dict[str, Any]) -> float:
    return run["request_rate"] if run.get("request_rate") is not None else run.get("max_concurrency") or 0


def _p50(run: dict[str, Any], key: str) -> float | None:
    return None if run.get(key) is None else run[key]["p50"]


def _sweep_figure(plt: Any, records: list[dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("output_tokens_per_s", "output tokens/s"), ("ttft_ms", "TTFT p50 (ms)"), ("tpot_ms", "TPOT p50 (ms)"))
    by_rate = all(run.get("request_rate") is not None for r in records for run in r["runs"])
    for ax, (key, title) in zip(axes, panels):
        for record in records:
            runs = sorted(record["runs"], key=_x)
            values = [run[key] if key == "output_tokens_per_s" else _p50(run, key) for run in runs]
            points = [(_x(run), v) for run, v in zip(runs, values) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=record["label"])
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)" if by_rate else "max concurrency")
        if not by_rate:
            ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(_subtitle(records))
    return fig


def _bar_figure(plt: Any, records: list[dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [r["label"] for r in records]
    runs = [r["runs"][0] for r in records]
    throughput = [run["output_tokens_per_s"] for run in runs]
    bars = axes[0].bar(labels, throughput, color="tab:blue")
    for bar, value in zip(bars, throughput):
        axes[0].annotate(f"{value:.0f} ({value / throughput[0]:.2f}x)", (bar.get_x() + bar.get_width() / 2, value),
                         ha="center", va="bottom", fontsize=9)
    axes[0].set_title(f"output tokens/s (ratio to {labels[0]})")
    e2e = [_p50(run, "e2e_ms") or 0 for run in runs]
    axes[1].bar(labels, [v / 1000 for v in e2e], color="tab:orange")
    axes[1].set_title("E2E latency p50 (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_subtitle(records))
    return fig


def _subtitle(records: list[dict[str, Any]]) -> str:
    env = records[0].get("environment", {})
    hardware = env.get("gpu") or f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} CPUs)"
    data = records[0].get("settings", {}).get("data", {})
    workload = (f"{data.get('dataset_path')} in {data.get('input_len')} / out {data.get('output_len')}, "
                f"{data.get('num_prompts')} prompts") if data else ""
    return f"{hardware}; {workload}"
