"""/metrics against a live server: it parses as Prometheus text, its counters and histograms move by what the
requests sent used, aborts are counted, KV usage returns to 0, and `monitor --once` renders it."""

from __future__ import annotations

import time

import httpx
import pytest
from live_server import wait_until
from prometheus_client.parser import text_string_to_metric_families

from microscale.monitor.scrape import Snapshot, delta, parse

pytest_plugins = ["live_server"]  # the server fixtures

P = "microscale:"
PROMPT = 'def add(a, b):\n    """Return the sum of two numbers, after checking that both of them are numbers."""\n'
COUNTERS = ["request_success", "prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries",
            "prefix_cache_hits", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens"]
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "process_resident_memory_bytes"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens",
              "engine_step_seconds"]


def _scrape(server) -> Snapshot:
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse(response.text, time.monotonic())


def _idle_snapshot(server) -> Snapshot:
    """A scrape once the engine is idle and its gauges say so (the loop thread records after the last step)."""
    server.wait_idle()
    scraped: list[Snapshot] = []

    def idle() -> bool:
        scraped.append(_scrape(server))
        return scraped[-1].value(f"{P}num_requests_running") == 0

    wait_until(idle, lambda: "the scraped gauges never showed the engine idle")
    return scraped[-1]


def test_metrics_parse_with_every_family(server):
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    assert all(families[P + name] == "counter" for name in COUNTERS)
    assert all(families[P + name] == "gauge" for name in GAUGES)
    assert all(families[P + name] == "histogram" for name in HISTOGRAMS)
    assert _scrape(server).value(f"{P}process_resident_memory_bytes") > 0


def test_counters_and_histograms_move_with_completed_requests(server):
    client = server.client()
    before = _idle_snapshot(server)
    probe = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert probe.usage.prompt_tokens > 16  # a full KV block, for the repeat to find in the prefix cache
    stop = probe.choices[0].text[2:4]
    responses = [
        probe,
        client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                  stop=[stop]),
        client.completions.create(model=server.model, prompt=["import os", "class A:"], max_tokens=5, n=2,
                                  temperature=0.8, seed=1),
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0),
    ]
    after = _idle_snapshot(server)
    choices = [c for r in responses for c in r.choices]
    num_requests = 1 + 1 + 2 + 1  # engine requests: one per prompt
    assert responses[1].choices[0].finish_reason == "stop"

    def grew(name: str, **labels: str) -> float:
        return delta(after, before, P + name, **labels)

    assert grew("prompt_tokens_total") == sum(r.usage.prompt_tokens for r in responses)
    assert grew("generation_tokens_total") == sum(r.usage.completion_tokens for r in responses)
    for reason in ("stop", "length"):
        expected = sum(c.finish_reason == reason for c in choices)
        assert grew("request_success_total", finished_reason=reason) == expected
    assert grew("request_success_total", finished_reason="abort") == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens"):
        assert grew(f"{name}_count") == num_requests, name
    assert grew("request_generation_tokens_count") == len(choices)
    assert grew("request_generation_tokens_sum") == sum(r.usage.completion_tokens for r in responses)
    assert grew("inter_token_latency_seconds_count") > 0 and grew("engine_step_seconds_count") > 0
    assert grew("prefix_cache_queries_total") >= grew("prefix_cache_hits_total") > 0  # the repeated prompt
    assert after.value(f"{P}kv_cache_usage_perc") == 0
    assert after.value(f"{P}num_requests_waiting") == 0


def test_abort_is_counted_and_kv_usage_returns_to_zero(server):
    before = _idle_snapshot(server)
    body = {"model": server.model, "prompt": "def main():", "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        lines = response.iter_lines()  # kept: a dropped iterator would close the stream at once
        next(lines)  # the request is running; leave mid-stream
        busy = _scrape(server)
    after = _idle_snapshot(server)
    assert busy.value(f"{P}kv_cache_usage_perc") > 0
    assert delta(after, before, f"{P}request_success_total", finished_reason="abort") == 1
    assert after.value(f"{P}kv_cache_usage_perc") == 0
    assert after.value(f"{P}num_requests_running") == 0


def test_monitor_once_renders_a_live_server(server, capsys):
    from microscale.cli import main

    server.client().completions.create(model=server.model, prompt="import sys", max_tokens=4, temperature=0)
    server.wait_idle()
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", "--server", server.url, "--once", "--interval", "0.05"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for label in ("requests/s", "output tokens/s", "running / waiting", "KV cache", "TTFT p50/p90/p99",
                  "ITL p50/p90/p99", "preemptions", "prefix cache hit rate", "process memory", "since start"):
        assert label in out, label
    assert "0 / 0" in out and "0.0%" in out and " ms" in out
    assert "length" in out
