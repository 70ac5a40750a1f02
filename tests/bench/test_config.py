"""`microscale bench throughput` settings: YAML + flags, and errors that name the key."""

from __future__ import annotations

import argparse

import pytest

from microscale.bench.config import BenchConfigError, add_override_flags, load_config, overrides_from_args

SEED_SHAPE = """
engine:
  model_path: models/tiny-llama-pycode
  backend: microscale
  max_batch_size: 32
  cache_max_entry_count: 0.8
  quant: none
  kv_cache_quant: none
  dtype: auto
data:
  dataset_path: random
  input_len: 512
  output_len: 256
  num_prompts: 200
  seed: 0
"""


def write(tmp_path, text):
    path = tmp_path / "bench.yaml"
    path.write_text(text)
    return path


def test_the_seed_shaped_yaml_loads(tmp_path):
    config = load_config(write(tmp_path, SEED_SHAPE))
    assert config.engine.max_batch_size == 32 and config.engine.cache_max_entry_count == 0.8
    assert config.data.input_len == 512 and config.data.num_prompts == 200 and config.data.dataset_path == "random"


def test_flags_override_the_yaml_and_none_keeps_it(tmp_path):
    parser = argparse.ArgumentParser()
    add_override_flags(parser, ("engine", "data"))
    args = parser.parse_args(["--max-batch-size", "8", "--dataset-path", "data/x.txt", "--kv-cache-memory", "2"])
    config = load_config(write(tmp_path, SEED_SHAPE), overrides_from_args(args))
    assert config.engine.max_batch_size == 8 and config.engine.kv_cache_memory == 2.0
    assert config.data.dataset_path == "data/x.txt" and config.data.output_len == 256  # untouched by flags
    assert config.engine.enforce_eager is False  # a switch left out keeps the default
    switched = load_config(None, overrides_from_args(parser.parse_args(["--enforce-eager", "--kernel-backend",
                                                                        "torch"])))
    assert switched.engine.enforce_eager is True and switched.engine.kernel_backend == "torch"


def test_no_yaml_gives_the_defaults():
    config = load_config(None)
    assert config.engine.backend == "microscale" and config.data.dataset_path == "random"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("engine:\n  max_batchsize: 4\n", "unknown key 'engine.max_batchsize'"),
        ("data:\n  input_len: long\n", "'data.input_len' must be an integer, got 'long'"),
        ("data:\n  num_prompts: 2.5\n", "'data.num_prompts' must be an integer"),
        ("engine:\n  max_batch_size: true\n", "'engine.max_batch_size' must be an integer, got True"),
        ("engine:\n  cache_max_entry_count: lots\n", "'engine.cache_max_entry_count' must be a number"),
        ("engine:\n  model_path: 3\n", "'engine.model_path' must be a string"),
        ("engine:\n  kv_cache_memory: [1]\n", "'engine.kv_cache_memory' must be a number or null"),
        ("server:\n  port: 1\n", "unknown section 'server'"),
        ("engine: 3\n", "'engine' must be a mapping"),
        ("- a\n- b\n", "must be a mapping"),
        ("engine: [\n", "not valid YAML"),
        ("engine:\n  backend: sglang\n", "'engine.backend' must be one of microscale, transformers, vllm"),
        ("data:\n  output_len: 0\n", "'data.output_len' must be at least 1"),
        ("data:\n  range_ratio: 1.5\n", "'data.range_ratio' must be in [0, 1)"),
        ("engine:\n  cache_max_entry_count: 0\n", "'engine.cache_max_entry_count' must be in (0, 1]"),
        ("engine:\n  gpu_memory_utilization: 1.2\n", "'engine.gpu_memory_utilization' must be in (0, 1]"),
        ("engine:\n  backend: transformers\n  quant: fp8\n", "unquantized baseline"),
        ("engine:\n  enforce_eager: 'no'\n", "'engine.enforce_eager' must be true or false, got 'no'"),
        ("engine:\n  kernel_backend: cuda\n", "'engine.kernel_backend' must be auto, torch or triton"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, text, message):
    with pytest.raises(BenchConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(BenchConfigError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")
