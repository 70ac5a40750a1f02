"""`microscale monitor` without a server: quantiles from histogram bucket deltas, counter rates, the rendered
dashboard (GPU rows only when reported), and a clean failure when the server cannot be reached."""

from __future__ import annotations

import re
import socket

import pytest
from rich.console import Console

from microscale.cli import main
from microscale.monitor.dashboard import render
from microscale.monitor.scrape import Snapshot, parse, quantiles, rate

P = "microscale:"


def _metrics(ttft_buckets: dict[str, int], generated: int, extra: str = "") -> str:
    lines = ["# TYPE microscale:time_to_first_token_seconds histogram"]
    lines += [f'microscale:time_to_first_token_seconds_bucket{{le="{le}"}} {n}' for le, n in ttft_buckets.items()]
    lines += [
        f"microscale:time_to_first_token_seconds_count {max(ttft_buckets.values())}",
        "# TYPE microscale:generation_tokens counter",
        f"microscale:generation_tokens_total {generated}",
        "# TYPE microscale:kv_cache_usage_perc gauge",
        "microscale:kv_cache_usage_perc 0.25",
    ]
    return "\n".join(lines) + "\n" + extra


OLDER = parse(_metrics({"0.1": 10, "0.2": 10, "0.4": 10, "+Inf": 10}, 100), at=0.0)
NEWER = parse(_metrics({"0.1": 10, "0.2": 20, "0.4": 30, "+Inf": 30}, 600), at=2.0)


def test_quantiles_come_from_the_bucket_deltas():
    # The 20 new observations: 10 in (0.1, 0.2], 10 in (0.2, 0.4].
    p50, p90, p99 = quantiles(NEWER, OLDER, f"{P}time_to_first_token_seconds", (0.5, 0.9, 0.99))
    assert p50 == pytest.approx(0.2)
    assert p90 == pytest.approx(0.2 + 0.2 * 0.8)
    assert p99 == pytest.approx(0.2 + 0.2 * 0.98)
    assert quantiles(NEWER, NEWER, f"{P}time_to_first_token_seconds", (0.5,)) == [None]


def test_quantile_past_the_last_finite_bucket_is_that_bound():
    newer = parse(_metrics({"0.1": 0, "+Inf": 4}, 0), at=1.0)
    assert quantiles(newer, Snapshot(0.0), f"{P}time_to_first_token_seconds", (0.5,)) == [0.1]


def test_rate_is_the_counter_delta_over_the_poll_interval():
    assert rate(NEWER, OLDER, f"{P}generation_tokens_total") == 250
    assert rate(NEWER, OLDER, f"{P}no_such_metric_total") is None


def test_dashboard_shows_gpu_rows_only_when_reported():
    console = Console(width=100, record=True)
    console.print(render("http://x", OLDER, OLDER, NEWER, "last 60s"))
    text = console.export_text()
    assert "250.0" in text and "25.0%" in text and "200.0 / 360.0 / 396.0 ms" in text
    assert "GPU" not in text
    gpu = "microscale:gpu_utilization_perc 0.5\nmicroscale:gpu_memory_used_bytes 2147483648\n"
    with_gpu = parse(_metrics({"0.1": 10, "0.2": 20, "0.4": 30, "+Inf": 30}, 600, gpu), at=2.0)
    console.print(render("http://x", OLDER, OLDER, with_gpu, "last 60s"))
    text = console.export_text()
    assert "GPU utilisation" in text and "50%" in text and "2.00 GiB" in text


def test_once_against_an_unreachable_server_fails_cleanly(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", "--server", f"http://127.0.0.1:{port}", "--once", "--interval", "0.01"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert f"cannot reach http://127.0.0.1:{port}/metrics" in captured.err
    assert "Traceback" not in captured.err + captured.out


def test_dashboard_shows_speculation_only_when_it_runs():
    def spec(drafts: int, proposed: int, accepted: int) -> str:
        return "".join(f"# TYPE microscale:spec_decode_{name} counter\nmicroscale:spec_decode_{name}_total {value}\n"
                       for name, value in (("num_drafts", drafts), ("num_draft_tokens", proposed),
                                           ("num_accepted_tokens", accepted)))

    console = Console(width=120, record=True)
    console.print(render("http://x", OLDER, OLDER, NEWER, "last 60s"))
    assert "speculation" not in console.export_text()
    older = parse(_metrics({"+Inf": 10}, 100, spec(10, 40, 20)), at=0.0)
    newer = parse(_metrics({"+Inf": 30}, 600, spec(110, 440, 320)), at=2.0)
    console.print(render("http://x", older, older, newer, "last 60s"))
    # 300 of 400 drafts accepted over 100 verifications: 1 + 3 tokens each.
    assert "75.0% of drafts accepted, mean accepted length 4.00 tokens per verification" in console.export_text()


def test_dashboard_colours_the_seed_figures_against_their_targets():
    seed = "".join(f"microscale:{line}\n" for line in (
        'device_utilization_perc{source="engine_loop"} 0.9', "batching_token_efficiency_perc 0.5",
        "batching_seq_occupancy_perc 0.95", 'achieved_memory_bandwidth_bytes_per_second{step="decode"} 2e10',
        'memory_bandwidth_peak_perc{step="decode"} 0.2', "device_peak_memory_bandwidth_bytes_per_second 1e11",
        "energy_per_output_token_joules 0.25"))
    itl = "".join(f'microscale:inter_token_latency_seconds_bucket{{le="{le}"}} {n}\n'
                  for le, n in (("0.01", 90), ("0.018", 100), ("+Inf", 100)))
    latest = parse(_metrics({"+Inf": 30}, 600, seed + itl), at=2.0)
    console = Console(width=120, record=True, force_terminal=True, color_system="standard")
    console.print(render("http://x", OLDER, OLDER, latest, "last 60s"))
    text = console.export_text(styles=True, clear=False)
    green, yellow, red = "\x1b[32m", "\x1b[33m", "\x1b[31m"
    assert f"{green}90% (engine loop busy)" in text and f"{red}50.0%" in text and f"{green}95.0%" in text
    assert f"20.0 GB/s = {red}20%" in text and "of the 100.0 GB/s peak" in text and "> 60% of peak" in text
    assert "2 TB/s on an H800, of its 3.35 TB/s peak" in text
    assert f"{green}5.6" in text and f"{yellow}17.2" in text and "< 15 ms" in text  # ITL p50 / p99
    assert "0.250 J" in text
    assert re.search(r"memory bandwidth \(mixed steps\) +—", console.export_text())
