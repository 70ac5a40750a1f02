"""LMDeploy's and vLLM's names: every mapped flag and bench key sets what it means (parsed only, no engine), is
logged, and a value the peer rejects fails naming the key; an unknown flag gets the subcommand's usage and the
nearest flag it has; a chat template given as vLLM's --chat-template replaces the tokenizer's."""

from __future__ import annotations

import argparse
import logging

import pytest

from microscale.bench.config import BenchConfigError, add_override_flags, load_config, overrides_from_args
from microscale.cli import build_parser, main
from microscale.config import EngineArgs
from microscale.engine.inputs import InputProcessor
from microscale.engine_flags import engine_kwargs
from microscale.peer_names import PEER_NAMES, translate_command
from microscale.tokenizer import load_chat_template

MODEL = "models/tiny-llama-pycode"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<bot>" \
           "{% endif %}"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(translate_command(list(argv)))


def engine_args(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(model=args.model, **engine_kwargs(args))


@pytest.fixture
def peer_log(caplog):
    with caplog.at_level(logging.INFO, logger="microscale.peer_names"):
        yield caplog


# (flags, setting, value): each peer flag, and the peers' flags that are microscale's own spelling too.
ENGINE_FLAGS = [
    (["--quant-policy", "0"], "kv_cache_quant", None),
    (["--quant-policy", "4"], "kv_cache_quant", "int4"),
    (["--quant-policy", "8"], "kv_cache_quant", "int8"),
    (["--session-len", "300"], "max_model_len", 300),
    (["--max-batch-size", "7"], "max_num_seqs", 7),
    (["--cache-max-entry-count", "0.5"], "cache_max_entry_count", 0.5),
    (["--kv-cache-dtype", "auto"], "kv_cache_quant", None),
    (["--kv-cache-dtype", "fp8"], "kv_cache_quant", "fp8"),
    (["--kv-cache-dtype", "fp8_e4m3"], "kv_cache_quant", "fp8"),
    (["--quantization", "fp8"], "quantization", "fp8-dynamic"),
    (["--quantization", "mxfp4"], "quantization", "mxfp4"),
    (["--gpu-memory-utilization", "0.7"], "gpu_memory_utilization", 0.7),
    (["--max-model-len", "128"], "max_model_len", 128),
    (["--max-num-seqs", "3"], "max_num_seqs", 3),
    (["--tensor-parallel-size", "2"], "tensor_parallel_size", 2),
    (["--chat-template", TEMPLATE], "chat_template", TEMPLATE),
]


@pytest.mark.parametrize(("flags", "setting", "value"), ENGINE_FLAGS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
@pytest.mark.parametrize("command", [["serve", "m"], ["generate", "m", "--prompt", "x"]])
def test_engine_flags(command, flags, setting, value, peer_log):
    args = engine_args(parse(*command, *flags))
    assert getattr(args, setting) == value
    assert {f: getattr(args, f) for f in vars(args) if f != setting} == \
        {f: getattr(EngineArgs(model="m"), f) for f in vars(args) if f != setting}  # nothing else moved
    if any(row.name == flags[0][2:].replace("-", "_") for row in PEER_NAMES):  # a peer's spelling: logged
        assert f"{flags[0]} {flags[1]} (" in peer_log.text


@pytest.mark.parametrize(("flags", "setting", "value"), [
    (["--server-name", "0.0.0.0"], "host", "0.0.0.0"),
    (["--server-port", "8000"], "port", 8000),
    (["--served-model-name", "gpt"], "served_model_name", "gpt"),
])
def test_serve_flags(flags, setting, value, peer_log):
    assert getattr(parse("serve", "m", *flags), setting) == value
    if any(row.name == flags[0][2:].replace("-", "_") for row in PEER_NAMES):  # a peer's spelling: logged
        assert f"{flags[0]} {flags[1]} (" in peer_log.text


@pytest.mark.parametrize("engine", ["turbomind", "pytorch"])
def test_lmdeploy_backend_runs_microscale_saying_so(engine, peer_log):
    assert engine_args(parse("serve", "m", "--backend", engine)) == EngineArgs(model="m")
    assert f"--backend {engine} (LMDeploy's name) sets nothing: microscale runs its own engine" in peer_log.text


def test_serve_api_server_is_lmdeploys_name_for_serve(peer_log):
    # The seed's command, with the bundled model for openai/gpt-oss.
    args = parse("serve", "api_server", "models/tiny-gptoss-pycode", "--backend", "turbomind", "--quant", "mxfp4",
                 "--tp", "1")
    assert args.func.__name__ == "cmd_serve" and args.model == "models/tiny-gptoss-pycode"
    assert (args.quantization, args.tensor_parallel_size) == ("mxfp4", 1)
    assert "`serve api_server` is LMDeploy's name for `microscale serve`" in peer_log.text


@pytest.mark.parametrize(("flags", "message"), [
    (["--quant-policy", "3"], "argument --quant-policy: invalid choice: 3 (choose from 0, 4, 8)"),
    (["--backend", "tensorrt"], "argument --backend: invalid choice: 'tensorrt'"),
    (["--kv-cache-dtype", "int8"], "argument --kv-cache-dtype: invalid choice: 'int8'"),
    (["--quantization", "awq"], "argument --quantization: invalid choice: 'awq'"),
    (["--server-port", "http"], "argument --server-port: invalid int value: 'http'"),
    (["--session-len", "0"], "--session-len must be at least 1, got 0."),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0."),
    (["--session-len", "5", "--max-model-len", "6"], "--session-len is LMDeploy's name for --max-model-len: give "
                                                     "--max-model-len or --session-len, not both."),
    (["--quant-policy", "8", "--kv-cache-dtype", "fp8"], "give --quant-policy or --kv-cache-dtype, not both"),
    (["--server-port", "1", "--port", "2"], "give --port or --server-port, not both"),
    (["--gpu-memory-utilisation", "0.9"], "unrecognized arguments: --gpu-memory-utilisation 0.9 (did you mean "
                                          "--gpu-memory-utilization?)"),
])
def test_bad_values_fail_naming_the_flag_under_serves_usage(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "m", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: microscale serve ") and message in err


def test_an_unknown_bench_flag_gets_the_bench_commands_usage(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--max-batchsize", "3"])
    err = capsys.readouterr().err
    assert err.startswith("usage: microscale bench throughput ")
    assert "unrecognized arguments: --max-batchsize 3 (did you mean --max-batch-size?)" in err


# (key, value, our key, what it sets) in the bench YAML's engine section; also flags of `bench throughput`.
BENCH_KEYS = [
    ("backend", "turbomind", "backend", "microscale"),
    ("backend", "pytorch", "backend", "microscale"),
    ("quant_policy", 0, "kv_cache_quant", "none"),
    ("quant_policy", 4, "kv_cache_quant", "int4"),
    ("quant_policy", 8, "kv_cache_quant", "int8"),
    ("session_len", 300, "max_model_len", 300),
    ("max_batch_size", 7, "max_batch_size", 7),
    ("cache_max_entry_count", 0.5, "cache_max_entry_count", 0.5),
    ("kv_cache_dtype", "fp8_e4m3", "kv_cache_quant", "fp8"),
]


@pytest.mark.parametrize(("key", "value", "ours", "expected"), BENCH_KEYS)
def test_bench_yaml_keys(tmp_path, key, value, ours, expected, peer_log):
    path = tmp_path / "bench.yaml"
    path.write_text(f"engine:\n  {key}: {value}\n")
    assert getattr(load_config(path).engine, ours) == expected
    parser = argparse.ArgumentParser()
    add_override_flags(parser, ("engine",))
    flags = parser.parse_args([f"--{key.replace('_', '-')}", str(value)])
    assert getattr(load_config(None, overrides_from_args(flags)).engine, ours) == expected
    if key != ours:
        assert f"'engine.{key}' {value} (" in peer_log.text


@pytest.mark.parametrize(("engine", "message"), [
    ({"quant_policy": 3}, "'engine.quant_policy' must be one of 0, 4, 8 (LMDeploy's quant_policy: 0 = 16-bit KV "
                          "cache, 4 = int4, 8 = int8), got 3."),
    ({"backend": "tensorrt"}, "'engine.backend' must be one of microscale, transformers, vllm (or LMDeploy's "
                              "turbomind / pytorch"),
    ({"session_len": 0}, "'engine.session_len' must be at least 1, got 0."),
    ({"kv_cache_dtype": "fp8_e5m2"}, "'engine.kv_cache_dtype' must be one of auto, fp8, fp8_e4m3"),
    ({"quant_policy": 8, "kv_cache_quant": "int8"}, "give 'engine.kv_cache_quant' or 'engine.quant_policy', not both"),
])
def test_bench_values_the_peer_rejects_fail_naming_the_key(engine, message):
    with pytest.raises(BenchConfigError) as error:
        load_config(None, {"engine": engine})
    assert message in str(error.value)


def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template("{{ 'a' }}\\n{{ 'é' }}") == "{{ 'a' }}\n{{ 'é' }}"  # escapes read as a shell user means
    with pytest.raises(ValueError, match="looks like a file path, but it cannot be read"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="chat_template does not compile: .* \\(line 1\\)"):
        load_chat_template("{% for m in messages %}")


def test_chat_template_replaces_the_tokenizers_everywhere_it_is_applied():
    # The InputProcessor's tokenizer is the one the chat and Responses endpoints, /tokenize, `microscale chat`
    # and LLM.chat apply templates with.
    inputs = InputProcessor(engine_args(parse("generate", MODEL, "--prompt", "x", "--chat-template", TEMPLATE)))
    messages = [{"role": "user", "content": "hi"}]
    assert inputs.tokenizer.apply_chat_template(messages) == "<user>hi<bot>"
    assert InputProcessor(EngineArgs(model=MODEL)).tokenizer.chat_template != TEMPLATE
