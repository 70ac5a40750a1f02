"""`microscale monitor`: a terminal dashboard over a server's /metrics, live or as one snapshot."""

from __future__ import annotations

import sys
import time
from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from microscale.monitor.scrape import ServerUnreachable, Snapshot, delta, fetch, quantiles, rate

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
    note = Text(f"{rates}; latencies and hit rate {window}", style="dim")
    return Panel(Group(table, note), title=f"microscale @ {server}", border_style="green")


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
