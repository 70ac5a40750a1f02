"""Charts of `microscale bench` results (matplotlib, imported only here), readable at a glance.

A sweep (several runs in one result) becomes lines against concurrency (or request rate): output tokens/s,
TTFT and TPOT as their p50 line with a band up to p90 and p99 markers. Single-run results (e.g. microscale vs
transformers vs a quantized model) become bars of output tokens/s (the ratio to the first written on each bar)
and E2E p50 bars with p90 / p99 markers. Every y axis starts at zero, so heights compare; results are named by
short labels (a model path's last folder); the legend sits outside the data; the title says the device and the
load average each result was measured under (recorded in its JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TAIL_MARKERS = (("p90", "v"), ("p99", "x"))  # quantile, marker


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
    plt = _pyplot()
    fig = build_figure(records)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" takes the legend outside the axes in
    plt.close(fig)
    return path


def build_figure(records: list[dict[str, Any]]) -> Any:
    """The chart of `records` as a matplotlib Figure."""
    if not records:
        raise ValueError("nothing to plot: no results given.")
    plt = _pyplot()
    labels = short_labels([r["label"] for r in records])
    sweep = any(len(r["runs"]) > 1 for r in records)
    fig = _sweep_figure(plt, records, labels) if sweep else _bar_figure(plt, records, labels)
    fig.suptitle(title(records, labels))
    fig.tight_layout()  # after the title, which it then makes room for
    return fig


def short_labels(labels: list[str]) -> list[str]:
    """Each label with a path shortened to its last part ("/m/Qwen3-8B" -> "Qwen3-8B"), unless that would make
    two labels alike: then those keep their last two parts, and what is still alike gets its position."""
    def last(label: str, parts: int) -> str:
        return "/".join(label.rstrip("/").split("/")[-parts:]) if "/" in label else label

    short = [last(label, 1) for label in labels]
    short = [s if short.count(s) == 1 else last(label, 2) for s, label in zip(short, labels)]
    return [s if short.count(s) == 1 else f"{s} #{i + 1}" for i, s in enumerate(short)]


def _x(run: dict[str, Any]) -> float:
    return run["request_rate"] if run.get("request_rate") is not None else run.get("max_concurrency") or 0


def _quantile(run: dict[str, Any], key: str, q: str) -> float | None:
    return None if run.get(key) is None else run[key][q]


def _sweep_figure(plt: Any, records: list[dict[str, Any]], labels: list[str]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("output_tokens_per_s", "output tokens/s"), ("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"))
    by_rate = all(run.get("request_rate") is not None for r in records for run in r["runs"])
    for ax, (key, name) in zip(axes, panels):
        for record, label, color in zip(records, labels, _colors(plt, len(records))):
            runs = sorted(record["runs"], key=_x)
            if key == "output_tokens_per_s":
                ax.plot([_x(run) for run in runs], [run[key] for run in runs], marker="o", color=color, label=label)
                continue
            runs = [run for run in runs if run.get(key) is not None]
            if not runs:
                continue
            xs = [_x(run) for run in runs]
            ax.plot(xs, [run[key]["p50"] for run in runs], marker="o", color=color, label=label)
            ax.fill_between(xs, [run[key]["p50"] for run in runs], [run[key]["p90"] for run in runs], color=color,
                            alpha=0.2, linewidth=0)
            ax.plot(xs, [run[key]["p99"] for run in runs], linestyle="none", marker="x", color=color)
        ax.set_title(name if key == "output_tokens_per_s" else f"{name}: p50, band to p90, x p99")
        ax.set_xlabel("request rate (req/s)" if by_rate else "max concurrency")
        if by_rate:
            ax.set_xlim(left=0)
        else:  # concurrencies double from one to the next: log 2, which cannot start at 0
            ax.set_xscale("log", base=2)
            concurrencies = sorted({_x(run) for r in records for run in r["runs"]})
            ax.set_xticks(concurrencies, [f"{c:g}" for c in concurrencies])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.0, 0.9))
    return fig


def _bar_figure(plt: Any, records: list[dict[str, Any]], labels: list[str]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = [r["runs"][0] for r in records]
    throughput = [run["output_tokens_per_s"] for run in runs]
    bars = axes[0].bar(labels, throughput, color="tab:blue")
    for bar, value in zip(bars, throughput):
        axes[0].annotate(f"{value:.0f} ({value / throughput[0]:.2f}x)", (bar.get_x() + bar.get_width() / 2, value),
                         ha="center", va="bottom", fontsize=9)
    axes[0].set_title(f"output tokens/s (ratio to {labels[0]})")
    axes[0].set_ylim(0, 1.12 * max(throughput) or 1)  # room for the numbers above the bars
    axes[1].bar(labels, [(_quantile(run, "e2e_ms", "p50") or 0) / 1000 for run in runs], color="tab:orange",
                label="p50")
    for q, marker in TAIL_MARKERS:
        points = [(label, value / 1000) for label, run in zip(labels, runs)
                  if (value := _quantile(run, "e2e_ms", q)) is not None]
        if points:
            axes[1].plot(*zip(*points), linestyle="none", marker=marker, color="black", label=q)
    axes[1].set_title("E2E latency (s)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    return fig


def _colors(plt: Any, n: int) -> list[Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def title(records: list[dict[str, Any]], labels: list[str]) -> str:
    """The device, the load average (1, 5, 15 min) each result ran under, and the workload."""
    devices = list(dict.fromkeys(_device(r.get("environment") or {}) for r in records))
    loads = [_load(r.get("environment") or {}) for r in records]
    if len(records) == 1:
        load = f"load average {loads[0]}"
    else:
        load = "load average " + ", ".join(f"{label} {value}" for label, value in zip(labels, loads))
    data = records[0].get("settings", {}).get("data", {})
    workload = (f"; {data.get('dataset_path')} in {data.get('input_len')} / out {data.get('output_len')}, "
                f"{data.get('num_prompts')} prompts") if data else ""
    return f"{' | '.join(devices)}; {load}{workload}"


def _device(env: dict[str, Any]) -> str:
    if env.get("gpu"):
        return f"{env.get('device', 'cuda')}: {env['gpu']}"
    threads = f", {env['torch_threads']} torch threads" if env.get("torch_threads") else ""
    return f"{env.get('device', 'cpu')}: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} CPUs{threads})"


def _load(env: dict[str, Any]) -> str:
    loadavg = env.get("loadavg")
    return "/".join(f"{x:.2f}" for x in loadavg) if loadavg else "not recorded"
