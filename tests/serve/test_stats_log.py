"""The periodic stats line, without a server or a clock: its wording is vLLM's, its throughputs are the metrics'
growth over the time an injected clock says passed, and an idle interval after an idle one goes to DEBUG."""

from __future__ import annotations

import logging

from microscale.serve.metrics import ServerMetrics
from microscale.serve.stats_log import StatsLogger, format_stats

_LOGGER = "microscale.serve.stats_log"


def _stats(prompt: int, generated: int, running: int = 0, waiting: int = 0, usage: float = 0.0,
           queries: int = 0, hits: int = 0) -> dict[str, float]:
    """An engine's get_stats() as a StepReport carries it."""
    totals = {"prompt_tokens": prompt, "generation_tokens": generated, "num_preemptions": 0,
              "prefix_cache_queries": queries, "prefix_cache_hits": hits, "spec_decode_num_drafts": 0,
              "spec_decode_num_draft_tokens": 0, "spec_decode_num_accepted_tokens": 0}
    return {**totals, "num_requests_running": running, "num_requests_waiting": waiting, "kv_cache_usage": usage}


def test_format_is_vllms():
    assert format_stats(603.94, 377.9, 17, 2, 0.018, 0.5) == (
        "Avg prompt throughput: 603.9 tokens/s, Avg generation throughput: 377.9 tokens/s, Running: 17 reqs, "
        "Waiting: 2 reqs, GPU KV cache usage: 1.8%, Prefix cache hit rate: 50.0%")


def test_each_line_covers_the_interval_since_the_last(caplog):
    metrics = ServerMetrics(max_model_len=128, model_name="m")
    metrics.new_engine({})
    metrics.record_stats(_stats(prompt=0, generated=0))
    now = [100.0]
    stats = StatsLogger(metrics, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger=_LOGGER)

    metrics.record_stats(_stats(prompt=200, generated=50, running=3, waiting=1, usage=0.25, queries=200, hits=50))
    now[0] += 10
    stats.log()
    metrics.record_stats(_stats(prompt=200, generated=80, running=1, usage=0.125, queries=200, hits=50))
    now[0] += 5
    stats.log()
    now[0] += 10
    stats.log()  # nothing generated, but the interval before was busy
    now[0] += 10
    stats.log()  # idle twice running: DEBUG only
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == _LOGGER]
    assert lines == [
        (logging.INFO, format_stats(20.0, 5.0, 3, 1, 0.25, 0.25)),
        (logging.INFO, format_stats(0.0, 6.0, 1, 0, 0.125, 0.0)),
        (logging.INFO, format_stats(0.0, 0.0, 1, 0, 0.125, 0.0)),
        (logging.DEBUG, format_stats(0.0, 0.0, 1, 0, 0.125, 0.0)),
    ]


def test_a_restarted_engine_does_not_count_backwards(caplog):
    metrics = ServerMetrics(max_model_len=128, model_name="m")
    metrics.new_engine({})
    metrics.record_stats(_stats(prompt=100, generated=100))
    now = [0.0]
    stats = StatsLogger(metrics, clock=lambda: now[0])
    metrics.new_engine({})  # a new engine process counts from zero again
    metrics.record_stats(_stats(prompt=0, generated=0))
    metrics.record_stats(_stats(prompt=30, generated=10))
    now[0] = 10.0
    caplog.set_level(logging.INFO, logger=_LOGGER)
    stats.log()
    assert [r.getMessage() for r in caplog.records if r.name == _LOGGER] == [format_stats(3.0, 1.0, 0, 0, 0.0, 0.0)]
