"""The seed's LMDeploy bench file (configs/bench/lmdeploy-seed-gptoss.yaml: the seed's text, the model path the
bundled gpt-oss) runs as written: `backend: turbomind` runs microscale's engine, `quant_policy: 4` its INT4 KV
cache. Offline there is no sharegpt.json, so the test writes a small ShareGPT-format one and points
--dataset-path at it; --num-prompts and --sharegpt-output-len keep the run short."""

from __future__ import annotations

import json

from microscale.cli import main

CONFIG = "configs/bench/lmdeploy-seed-gptoss.yaml"


def test_the_seeds_bench_config_runs_on_the_bundled_gpt_oss(tmp_path, caplog):
    conversations = [[{"from": "human", "value": f"def add_{i}(a, b):\n    return a + b\n" * 2},
                      {"from": "gpt", "value": "print(add(1, 2))"}] for i in range(3)]
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"id": str(i), "conversations": c} for i, c in enumerate(conversations)]))
    out = tmp_path / "result.json"
    with caplog.at_level("INFO", logger="microscale.peer_names"):
        main(["bench", "throughput", "--config", CONFIG, "--dataset-path", str(dataset), "--num-prompts", "2",
              "--sharegpt-output-len", "3", "--kv-cache-memory", "0.05", "--json", str(out)])
    record = json.loads(out.read_text())
    engine = record["settings"]["engine"]
    assert (engine["backend"], engine["kv_cache_quant"], engine["max_batch_size"]) == ("microscale", "int4", 32)
    assert engine["model_path"].endswith("models/tiny-gptoss-pycode") and engine["cache_max_entry_count"] == 0.8
    assert record["settings"]["dataset"]["name"] == "sharegpt"
    (run,) = record["runs"]
    assert run["completed"] == 2 and run["output_tokens"] == 6
    assert "'engine.backend' turbomind (LMDeploy's name) sets 'engine.backend' microscale" in caplog.text
    assert "'engine.quant_policy' 4 (LMDeploy's name) sets 'engine.kv_cache_quant' int4" in caplog.text
