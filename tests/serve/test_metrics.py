"""/metrics against a live server: it parses as Prometheus text, every series carries the model_name label and none
is a `_created` one, its counters and histograms move by what the requests sent used, aborts are counted, KV usage
returns to 0, `monitor --once` renders it, and every query of examples/grafana.json (vLLM's dashboard) finds its
series."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from conftest import REPO
from live_server import wait_until
from prometheus_client.parser import text_string_to_metric_families

from microscale.monitor.scrape import Snapshot, delta, parse

pytest_plugins = ["live_server"]  # the server fixtures

P = "microscale:"
PROMPT = 'def add(a, b):\n    """Return the sum of two numbers, after checking that both of them are numbers."""\n'
COUNTERS = ["request_success", "prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries",
            "prefix_cache_hits", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens"]
GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "process_resident_memory_bytes",
          "cache_config_info", "device_utilization_perc", "batching_token_efficiency_perc",
          "batching_seq_occupancy_perc", "achieved_memory_bandwidth_bytes_per_second", "memory_bandwidth_peak_perc",
          "device_peak_memory_bandwidth_bytes_per_second"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens",
              "engine_step_seconds", "request_time_per_output_token_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_inference_time_seconds", "request_max_num_generation_tokens",
              "iteration_tokens_total"]


def _scrape(server) -> Snapshot:
    response = httpx.get(f"{server.url}/metrics", timeout=300)
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
    response = httpx.get(f"{server.url}/metrics", timeout=300)
    parsed = list(text_string_to_metric_families(response.text))
    families = {f.name: f.type for f in parsed}
    assert all(families[P + name] == "counter" for name in COUNTERS)
    assert all(families[P + name] == "gauge" for name in GAUGES)
    assert all(families[P + name] == "histogram" for name in HISTOGRAMS)
    samples = [sample for family in parsed if family.name.startswith(P) for sample in family.samples]
    assert all(sample.labels.get("model_name") == server.model for sample in samples)
    assert not [sample.name for sample in samples if sample.name.endswith("_created")]
    snapshot = _scrape(server)
    assert snapshot.value(f"{P}process_resident_memory_bytes") > 0
    # vLLM's cache_config_info: the KV cache's settings as labels of a gauge at 1.
    (labels, value), = snapshot.samples[f"{P}cache_config_info"].items()
    config = dict(labels)
    assert value == 1 and config["block_size"] == "16" and config["cache_dtype"] == "auto"
    assert int(config["num_gpu_blocks"]) == server.engine.latest_stats["kv_cache_blocks_total"]


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
    for name in ("request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
                 "request_max_num_generation_tokens"):
        assert grew(f"{name}_count") == num_requests, name
    # Only requests of two tokens or more have a time per output token (the stopped one may have had one).
    assert 0 < grew("request_time_per_output_token_seconds_count") <= num_requests
    assert grew("request_max_num_generation_tokens_sum") <= grew("request_generation_tokens_sum")
    # One observation per step, of the tokens it computed: at least every prompt token the prefix cache did not hold
    # and every output token but each sequence's last.
    assert grew("iteration_tokens_total_count") == grew("engine_step_seconds_count")
    assert grew("iteration_tokens_total_sum") >= (grew("prompt_tokens_total") - grew("prefix_cache_hits_total")
                                                   + grew("generation_tokens_total") - len(choices))
    assert grew("request_generation_tokens_sum") == sum(r.usage.completion_tokens for r in responses)
    assert grew("inter_token_latency_seconds_count") > 0 and grew("engine_step_seconds_count") > 0
    assert grew("prefix_cache_queries_total") >= grew("prefix_cache_hits_total") > 0  # the repeated prompt
    assert after.value(f"{P}kv_cache_usage_perc") == 0
    assert after.value(f"{P}num_requests_waiting") == 0


def test_abort_is_counted_and_kv_usage_returns_to_zero(server):
    before = _idle_snapshot(server)
    body = {"model": server.model, "prompt": "def main():", "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=300) as response:
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


# ---- vLLM's Grafana dashboard ------------------------------------------------------------------------------------

DASHBOARD = REPO / "examples" / "grafana.json"
_SELECTOR = re.compile(r"(microscale:\w+)\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)="([^"]*)"')
_GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")


def test_every_grafana_query_finds_its_series(server):
    """examples/grafana.json holds vLLM's example dashboard's queries with our prefix: each metric it names must be
    exported, with the labels its selectors filter on ($model_name: the served name) and those it groups by, and the
    counters and histograms must hold data once a request ran. A renamed metric or label breaks this."""
    text = DASHBOARD.read_text()
    assert "vllm:" not in text
    dashboard = json.loads(text)
    assert "label_values(model_name)" in json.dumps(dashboard["templating"])
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) == 27  # vLLM's 12 panels
    server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0)
    server.wait_idle()
    exported: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=300).text):
        for sample in family.samples:
            exported.setdefault(sample.name, []).append((sample.labels, sample.value))
    for query in queries:
        selectors = _SELECTOR.findall(query)
        assert selectors, query
        grouped_by = {label.strip() for group in _GROUPING.findall(query) for label in group.split(",")}
        for name, matchers in selectors:
            wanted = {label: value.replace("$model_name", server.model) for label, value in _MATCHER.findall(matchers)}
            assert wanted, f"{query}: an unfiltered selector"
            series = [(labels, value) for labels, value in exported.get(name, []) if wanted.items() <= labels.items()]
            assert series, f"{query}: no series {name}{wanted}"
            assert all(grouped_by <= labels.keys() for labels, _ in series), f"{query}: not all of {grouped_by}"
            if name.endswith(("_total", "_sum", "_count", "_bucket")):
                assert sum(value for _, value in series) > 0, f"{query}: {name} holds no data"
