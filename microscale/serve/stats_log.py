"""The stats line a vLLM server logs every few seconds: average prompt and generation throughput since the last
line, requests running and waiting, KV cache usage and the prefix cache hit rate. Read from the server's metrics,
so it counts what /metrics counts (across engine restarts too). A line with nothing to say (no tokens in this
interval nor in the one before) goes to DEBUG, as vLLM's does, so an idle server does not fill its log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads this module's default without loading the server's dependencies
    from microscale.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0  # vLLM's
_TOTALS = ("prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total", "prefix_cache_hits_total")


def format_stats(
    prompt_throughput: float, generation_throughput: float, running: int, waiting: int, kv_cache_usage: float,
    prefix_cache_hit_rate: float,
) -> str:
    """vLLM's wording (throughputs in tokens/s; usage and hit rate as fractions, printed as percentages)."""
    return (f"Avg prompt throughput: {prompt_throughput:.1f} tokens/s, "
            f"Avg generation throughput: {generation_throughput:.1f} tokens/s, "
            f"Running: {running} reqs, Waiting: {waiting} reqs, "
            f"GPU KV cache usage: {kv_cache_usage:.1%}, Prefix cache hit rate: {prefix_cache_hit_rate:.1%}")


class StatsLogger:
    """`log()` writes one line covering the time since the previous one (or since it was made). `clock`: seconds,
    time.monotonic() unless a test gives its own."""

    def __init__(self, metrics: ServerMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics, self.clock = metrics, clock
        self._time = clock()
        self._totals = self._read_totals()
        self._was_busy = False

    def _read_totals(self) -> dict[str, float]:
        return {name: self.metrics.value(name) for name in _TOTALS}

    def log(self) -> None:
        now, totals = self.clock(), self._read_totals()
        elapsed = now - self._time
        grown = {name: totals[name] - self._totals[name] for name in _TOTALS}
        self._time, self._totals = now, totals
        prompt, generation = ((grown[name] / elapsed if elapsed > 0 else 0.0)
                              for name in ("prompt_tokens_total", "generation_tokens_total"))
        queries = grown["prefix_cache_queries_total"]
        hit_rate = grown["prefix_cache_hits_total"] / queries if queries else 0.0
        busy = bool(prompt or generation)
        level = logging.INFO if busy or self._was_busy else logging.DEBUG
        self._was_busy = busy
        logger.log(level, "%s", format_stats(
            prompt, generation, int(self.metrics.value("num_requests_running")),
            int(self.metrics.value("num_requests_waiting")), self.metrics.value("kv_cache_usage_perc"), hit_rate))


async def log_stats_every(interval_s: float, stats: StatsLogger) -> None:
    """Until cancelled (the server's lifespan runs it)."""
    while True:
        await asyncio.sleep(interval_s)
        stats.log()
