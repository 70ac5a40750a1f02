"""Bench charts read at a glance: short labels, legend outside the data, y axes from zero, p90/p99 beside p50,
and the device and load average in the title; checked on the Figure, not on pixels."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from microscale.bench.plot import build_figure, short_labels  # noqa: E402

ENV = {"device": "cpu", "gpu": None, "cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2,
       "loadavg": [1.5, 0.75, 0.25]}


def _stats(p50):
    return {"mean": p50, "p50": p50, "p90": 2 * p50, "p99": 3 * p50}


def _run(concurrency, tokens_per_s, ms):
    return {"max_concurrency": concurrency, "request_rate": None, "output_tokens_per_s": tokens_per_s,
            "ttft_ms": _stats(ms), "tpot_ms": _stats(ms / 10), "e2e_ms": _stats(100 * ms)}


def _record(label, runs, loadavg=ENV["loadavg"]):
    return {"label": label, "runs": runs, "environment": {**ENV, "loadavg": loadavg},
            "settings": {"data": {"dataset_path": "random", "input_len": 32, "output_len": 8, "num_prompts": 4}}}


def test_labels_are_short_and_stay_distinct():
    assert short_labels(["/models/a/Qwen3-8B", "microscale int8", "models/tiny/"]) == \
        ["Qwen3-8B", "microscale int8", "tiny"]
    assert short_labels(["/x/one/model", "/y/two/model"]) == ["one/model", "two/model"]
    assert short_labels(["/a/m/model", "/b/m/model"]) == ["m/model #1", "m/model #2"]


def test_sweep_chart():
    fig = build_figure([_record("/home/u/models/Llama-3.1-8B", [_run(1, 50, 20), _run(4, 150, 40)]),
                        _record("vllm", [_run(1, 60, 10), _run(4, 200, 30)], loadavg=[3.0, 2.0, 1.0])])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["Llama-3.1-8B", "vllm"]
    assert legend.get_bbox_to_anchor().x0 >= max(ax.get_position().x1 for ax in fig.axes) * fig.bbox.width
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0 and ax.get_legend() is None
    ttft = fig.axes[1]
    assert "p90" in ttft.get_title() and "p99" in ttft.get_title()
    assert len(ttft.collections) == 2  # a p50..p90 band per result
    p99 = [line for line in ttft.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_ydata()) for line in p99] == [[60, 120], [30, 90]]
    title = fig._suptitle.get_text()
    assert "cpu: Test CPU (2 CPUs, 2 torch threads)" in title
    assert "Llama-3.1-8B 1.50/0.75/0.25" in title and "vllm 3.00/2.00/1.00" in title


def test_bar_chart():
    fig = build_figure([_record("models/tiny-llama-pycode", [_run(8, 100, 10)]),
                        _record("transformers", [_run(8, 25, 40)], loadavg=None)])
    throughput, e2e = fig.axes
    assert [t.get_text() for t in throughput.get_xticklabels()] == ["tiny-llama-pycode", "transformers"]
    assert throughput.get_ylim()[0] == 0 and e2e.get_ylim()[0] == 0
    legend = e2e.get_legend()
    assert sorted(t.get_text() for t in legend.get_texts()) == ["p50", "p90", "p99"]
    assert legend.get_bbox_to_anchor().x0 >= e2e.get_position().x1 * fig.bbox.width  # right of the bars
    markers = {line.get_label(): list(line.get_ydata()) for line in e2e.get_lines()}
    assert markers == {"p90": [2.0, 8.0], "p99": [3.0, 12.0]}  # seconds
    title = fig._suptitle.get_text()
    assert "tiny-llama-pycode 1.50/0.75/0.25" in title and "transformers not recorded" in title


def test_no_records_is_an_error():
    with pytest.raises(ValueError, match="nothing to plot"):
        build_figure([])
