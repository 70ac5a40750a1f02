"""`microscale monitor`: a terminal dashboard over a server's /metrics, live or as one snapshot."""

from __future__ import annotations

import sys
import time
from collections import deque

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from microscale.monitor.scrape import ServerUnreachable, Snapshot, delta, fetch, quantiles, rate
from microscale.serve.seed_figures import BANDWIDTH_TARGET_NOTE, TARGETS, WINDOW_S

P = "microscale:"
QUANTILES = (0.5, 0.9, 0.99)
_BAR_WIDTH = 30


def run_monitor(server: str, interval: float, window: float, once: bool, console: Console | None = None) -> int:
    """Poll until interrupted (or, with once, print one snapshot); the exit status."""
    console = console or Console()
    if once:
        return _print_once(server, interval, console)
    history: deque[Snapshot] = deque()
    with Live(Text(f"connecting to {server} ..."), console=console, auto_refresh=False) as live:
        while True:
            try:
                history.append(fetch(server))
            except ServerUnreachable as e:
                live.update(_unreachable(e, interval), refresh=True)
            else:
                # Keep what the window needs: the newest poll at least `window` seconds back, and two polls.
                while len(history) > 2 and history[1].time <= history[-1].time - window:
                    history.popleft()
                previous = history[-2] if len(history) > 1 else history[-1]
                live.update(render(server, history[0], previous, history[-1], f"last {window:g}s"), refresh=True)
            time.sleep(interval)


def _print_once(server: str, interval: float, console: Console) -> int:
    """Two polls `interval` apart (for rates); quantiles and hit rate cover everything since the server started."""
    try:
        first = fetch(server)
        time.sleep(interval)
        last = fetch(server)
    except ServerUnreachable as e:
        print(f"microscale monitor: {e}", file=sys.stderr)
        return 1
    console.print(render(server, Snapshot(first.time), first, last, "since start"))
    return 0


def _unreachable(error: ServerUnreachable, interval: float) -> Panel:
    return Panel(Text(f"{error}\nretrying every {interval:g}s (Ctrl-C to quit)", style="red"),
                 title="microscale monitor", border_style="red")


def render(server: str, window_start: Snapshot, previous: Snapshot, latest: Snapshot, window: str) -> Panel:
    """Rates between the last two polls; quantiles and the prefix-cache hit rate since window_start."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    row = table.add_row
    row("requests/s", _number(rate(latest, previous, f"{P}request_success_total"), ".2f"))
    row("output tokens/s", _number(rate(latest, previous, f"{P}generation_tokens_total"), ".1f"))
    running, waiting = latest.value(f"{P}num_requests_running"), latest.value(f"{P}num_requests_waiting")
    row("running / waiting", f"{_number(running, '.0f')} / {_number(waiting, '.0f')}")
    row("KV cache", _usage_bar(latest.value(f"{P}kv_cache_usage_perc")))
    for label, histogram in (("TTFT", "time_to_first_token_seconds"), ("ITL", "inter_token_latency_seconds")):
        row(f"{label} p50/p90/p99", _latencies(quantiles(latest, window_start, f"{P}{histogram}", QUANTILES)))
    finished = {r: latest.value(f"{P}request_success_total", finished_reason=r) for r in ("stop", "length", "abort")}
    row("finished (total)", "  ".join(f"{r} {_number(v, '.0f')}" for r, v in finished.items()))
    row("preemptions (total)", _number(latest.value(f"{P}num_preemptions_total"), ".0f"))
    queries = delta(latest, window_start, f"{P}prefix_cache_queries_total")
    hits = delta(latest, window_start, f"{P}prefix_cache_hits_total")
    row("prefix cache hit rate", f"{hits / queries:.1%}" if queries and hits is not None else "—")
    drafts = delta(latest, window_start, f"{P}spec_decode_num_drafts_total")
    if drafts:  # only a server that speculates
        proposed = delta(latest, window_start, f"{P}spec_decode_num_draft_tokens_total")
        accepted = delta(latest, window_start, f"{P}spec_decode_num_accepted_tokens_total")
        row("speculation", f"{accepted / proposed:.1%} of drafts accepted, mean accepted length "
                           f"{1 + accepted / drafts:.2f} tokens per verification")
    row("process memory", _bytes(latest.value(f"{P}process_resident_memory_bytes")))
    gpu_util, gpu_memory = latest.value(f"{P}gpu_utilization_perc"), latest.value(f"{P}gpu_memory_used_bytes")
    if gpu_util is not None:
        row("GPU utilisation", f"{gpu_util:.0%}")
    if gpu_memory is not None:
        row("GPU memory", _bytes(gpu_memory))
    elapsed = latest.time - previous.time
    rates = f"rates over the last {elapsed:.1f}s" if elapsed > 0 else "rates from the next poll"
    note = Text(f"{rates}; latencies and hit rate {window}; the seed's figures over the server's last "
                f"{WINDOW_S:g}s of steps; bandwidth target: {BANDWIDTH_TARGET_NOTE}", style="dim")
    return Panel(Group(table, seed_figures(latest, window_start), note), title=f"microscale @ {server}",
                 border_style="green")


def seed_figures(latest: Snapshot, window_start: Snapshot) -> Table:
    """The seed's four figures (and energy per token where NVML reads it), each coloured against its target."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for name in ("seed figure", "now", "target"):
        table.add_column(name, style="bold cyan" if name == "seed figure" else None)
    utilization = f"{P}device_utilization_perc"
    nvml = latest.value(utilization, source="nvml")
    used, source = (nvml, "NVML") if nvml is not None else (latest.value(utilization, source="engine_loop"),
                                                             "engine loop busy")
    row = table.add_row
    row("device utilisation", _graded(used, "utilization", f"{{:.0%}} ({source})"), TARGETS["utilization"].text)
    for label, metric in (("batching: tokens / budget", "batching_token_efficiency_perc"),
                          ("batching: running / max seqs", "batching_seq_occupancy_perc")):
        row(label, _graded(latest.value(f"{P}{metric}"), "batching", "{:.1%}"), TARGETS["batching"].text)
    peak = latest.value(f"{P}device_peak_memory_bandwidth_bytes_per_second")
    for step in ("decode", "mixed"):
        achieved = latest.value(f"{P}achieved_memory_bandwidth_bytes_per_second", step=step)
        share = latest.value(f"{P}memory_bandwidth_peak_perc", step=step)
        text = Text("—") if achieved is None else Text(f"{achieved / 1e9:.1f} GB/s")
        if share is not None and peak is not None:
            text.append(" = ").append_text(_graded(share, "bandwidth", "{:.0%}"))
            text.append(f" of the {peak / 1e9:.1f} GB/s peak")
        row(f"memory bandwidth ({step} steps)", text, TARGETS["bandwidth"].text)
    p50, p99 = quantiles(latest, window_start, f"{P}inter_token_latency_seconds", (0.5, 0.99))
    latency = Text("— (no requests)") if p50 is None else Text.assemble(
        _graded(p50, "latency", "{:.1f}", 1000), " / ", _graded(p99, "latency", "{:.1f}", 1000), " ms")
    row("per-token latency p50 / p99", latency, TARGETS["latency"].text)
    energy = latest.value(f"{P}energy_per_output_token_joules")
    if energy is not None:
        row("energy per output token", f"{energy:.3f} J", "")
    return table


def _graded(value: float | None, target: str, fmt: str, scale: float = 1) -> Text:
    """The value, formatted (times `scale`), in its grade's colour against the target."""
    if value is None:
        return Text("—")
    return Text(fmt.format(value * scale), style=TARGETS[target].grade(value))


def _number(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _latencies(values: list[float | None]) -> str:
    if values[0] is None:
        return "— (no requests)"
    return " / ".join(f"{v * 1000:.1f}" for v in values) + " ms"


def _usage_bar(fraction: float | None) -> Text:
    if fraction is None:
        return Text("—")
    filled = round(fraction * _BAR_WIDTH)
    color = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    return Text.assemble(("█" * filled, color), ("░" * (_BAR_WIDTH - filled), "dim"), f" {fraction:.1%}")


def _bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value / 1024:.0f} KiB"
