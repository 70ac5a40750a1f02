"""`microscale bench throughput | serve | plot` end to end on the bundled model (CPU, small workloads)."""

from __future__ import annotations

import json

import pytest

from microscale.bench.report import LATENCY_KEYS, summarize
from microscale.cli import main

pytest_plugins = ["tests.serve.live_server"]

RESULT_KEYS = {"num_requests", "completed", "failed", "duration_s", "input_tokens", "output_tokens", "requests_per_s",
               "input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s", *LATENCY_KEYS}
SETTINGS_KEYS = {"model_path", "backend", "max_batch_size", "cache_max_entry_count", "quant", "kv_cache_quant",
                 "dtype", "kv_cache_memory"}
SMALL = ["--num-prompts", "8", "--input-len", "24", "--output-len", "6", "--dtype", "float32"]


def bench(tmp_path, *argv):
    out = tmp_path / "result.json"
    main(["bench", *argv, "--json", str(out)])
    return json.loads(out.read_text())


def test_summaries_interpolate_percentiles_in_ms():
    stats = summarize([0.001 * v for v in range(1, 101)])
    assert stats["mean"] == pytest.approx(50.5) and stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1) and stats["p99"] == pytest.approx(99.01)
    assert summarize([]) is None


def test_throughput_microscale_writes_every_field(tmp_path, capsys):
    record = bench(tmp_path, "throughput", "--model-path", "models/tiny-llama-pycode", *SMALL, "--max-batch-size", "4")
    assert record["kind"] == "throughput" and record["label"] == "microscale"
    assert SETTINGS_KEYS <= set(record["settings"]["engine"])
    assert record["settings"]["data"]["seed"] == 0 and record["settings"]["dataset"]["num_requests"] == 8
    env = record["environment"]
    assert env["device"] == "cpu" and env["cpu"] and env["versions"]["torch"] and env["versions"]["microscale"]
    (run,) = record["runs"]
    assert RESULT_KEYS <= set(run)
    assert run["completed"] == 8 and run["output_tokens"] == 8 * 6 and run["input_tokens"] == 8 * 24
    assert run["output_tokens_per_s"] == pytest.approx(run["output_tokens"] / run["duration_s"], rel=1e-3)
    for key in LATENCY_KEYS:
        stats = run[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], key
    # Everything arrives at once and max_batch_size is 4: the second half waits, so E2E spreads out.
    assert run["e2e_ms"]["p99"] > run["ttft_ms"]["p50"]
    assert run["kv_cache"]["tokens"] == run["kv_cache"]["blocks"] * run["kv_cache"]["block_size"] > 0
    assert run["peak_memory"]["host_rss_gib"] > 0
    # The roofline of the timed steps: 8 prompts' prefill steps and the decode steps after them.
    roofline, peaks = run["roofline"], run["device_peaks"]
    assert peaks["bytes_per_s"] > 0 and peaks["flops_per_s"] > 0 and peaks["device"]
    assert roofline["all"]["steps"] == roofline["decode"]["steps"] + roofline["mixed"]["steps"]
    for kind in ("decode", "mixed"):
        r = roofline[kind]
        assert r["gb_per_s"] > 0 and r["tflop_per_s"] > 0 and r["steps"] > 0
        assert r["bandwidth_of_peak"] == pytest.approx(r["gb_per_s"] * 1e9 / peaks["bytes_per_s"], rel=1e-2)
        assert r["speed_of_light"] == max(r["bandwidth_of_peak"], r["compute_of_peak"])
    # Random prompts share no block, but the warm-up ran the first two: their first 16-token blocks are cached.
    assert run["prefix_cache_hit_rate"] == round(2 * 16 / (8 * 24), 4)
    assert "speed of light" in " ".join(capsys.readouterr().out.split())  # rich wraps the line


def test_throughput_reports_speculative_decoding(tmp_path, capsys):
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    record = bench(tmp_path, "throughput", "--model-path", "models/tiny-llama-pycode", "--dataset-path",
                   "data/pycode-valid.txt", *SMALL, "--output-len", "24", "--speculative-config", spec)
    assert json.loads(record["settings"]["engine"]["speculative_config"]) == json.loads(spec)
    (run,) = record["runs"]
    got = run["speculative_decoding"]
    assert (got["method"], got["num_speculative_tokens"]) == ("ngram", 3)
    assert 0 < got["accepted_tokens"] <= got["draft_tokens"] and got["verifications"] > 0
    assert got["acceptance_rate"] == round(got["accepted_tokens"] / got["draft_tokens"], 4)
    assert got["mean_accepted_length"] == round(1 + got["accepted_tokens"] / got["verifications"], 3)
    assert "mean accepted length" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "throughput", *SMALL, "--speculative-config", '{"method": "eagle"}'])
    assert "'engine.speculative_config'" in capsys.readouterr().err


def test_throughput_from_yaml_with_the_transformers_baseline(tmp_path):
    config = tmp_path / "bench.yaml"
    config.write_text("engine:\n  model_path: models/tiny-llama-pycode\n  backend: transformers\n  max_batch_size: 3\n"
                      "  dtype: float32\ndata:\n  dataset_path: data/pycode-valid.txt\n  input_len: 16\n"
                      "  output_len: 5\n  num_prompts: 4\n")
    record = bench(tmp_path, "throughput", "--config", str(config))
    (run,) = record["runs"]
    assert record["settings"]["dataset"]["name"] == "text" and run["backend"] == "transformers"
    assert run["output_tokens"] == 20 and run["generated_tokens"] == 20 and run["ttft_ms"] is None
    assert run["e2e_ms"]["p50"] > 0


def test_throughput_vllm_without_vllm_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "throughput", *SMALL, "--backend", "vllm", "--vllm-python", str(tmp_path / "python")])
    assert exit_.value.code == 2
    assert "engine.vllm_python" in capsys.readouterr().err


def test_yaml_errors_reach_the_user_as_one_line(tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text("engine:\n  max_batch: 3\n")
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown key 'engine.max_batch'" in err and "Traceback" not in err


def test_serve_sweep_against_a_live_server(server, tmp_path):
    record = bench(tmp_path, "serve", "--base-url", server.url, "--api-key", server.api_key, "--tokenizer",
                   "models/tiny-llama-pycode", "--num-prompts", "6", "--input-len", "20", "--output-len", "5",
                   "--sweep", "1,3", "--plot", str(tmp_path / "sweep.png"))
    assert record["kind"] == "serve" and record["settings"]["model"] == server.model
    assert [run["max_concurrency"] for run in record["runs"]] == [1, 3]
    for run in record["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0 and run["output_tokens"] == 30
        for key in LATENCY_KEYS:
            assert 0 < run[key]["p50"] <= run[key]["p99"], key
        assert RESULT_KEYS <= set(run)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    server.wait_idle()


def test_serve_request_rate_and_text_prompts(server, tmp_path):
    record = bench(tmp_path, "serve", "--base-url", server.url, "--api-key", server.api_key, "--tokenizer",
                   "models/tiny-llama-pycode", "--dataset-path", "data/pycode-valid.txt", "--num-prompts", "4",
                   "--input-len", "16", "--output-len", "4", "--request-rate", "50", "--prompt-format", "text")
    (run,) = record["runs"]
    assert run["request_rate"] == 50 and run["completed"] == 4 and run["output_tokens"] == 16


def test_serve_errors_are_one_line(server, tmp_path, capsys):
    base = ["bench", "serve", "--tokenizer", "models/tiny-llama-pycode", "--num-prompts", "2", "--input-len", "8",
            "--output-len", "2"]
    with pytest.raises(SystemExit):  # no API key: the server answers 401, the warm-up says so
        main([*base, "--base-url", server.url, "--model", server.model])
    assert "401" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--base-url", "http://127.0.0.1:9", "--model", "x"])
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


def test_plot_several_results_on_one_chart(tmp_path, capsys):
    a = bench(tmp_path, "throughput", *SMALL, "--max-batch-size", "8", "--label", "microscale")
    (tmp_path / "a.json").write_text(json.dumps(a))
    b = {**a, "label": "other", "runs": [{**a["runs"][0], "output_tokens_per_s": 1.0}]}
    (tmp_path / "b.json").write_text(json.dumps(b))
    main(["bench", "plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "cmp.png")])
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["bench", "plot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")])
    assert "no 'runs' list" in capsys.readouterr().err
