"""The `microscale` CLI: --help, generate with --prompt and with a JSONL --prompts-file / --output, chat,
and user errors as exit code 2 with one line on stderr (no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest
import torch
from conftest import BUNDLED_MODEL, REPO

from microscale import LLM, SamplingParams
from microscale.cli import main

VALID_TEXT = REPO / "data" / "pycode-valid.txt"
ENGINE = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8"]
GREEDY = ["--temperature", "0", "--ignore-eos"]
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["x"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model())


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype=torch.float32, max_model_len=128)


def complete(llm, prompt, max_tokens):
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def run_cli(argv) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    return exc.value.code or 0


def assert_one_line_error(capsys, argv, match: str, command: str = "generate"):
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"microscale {command}: error: ")
    assert match in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["quantize"]])
def test_help(capsys, command):
    assert run_cli([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: microscale")
    if command == ["generate"]:
        for flag in ("--prompt", "--prompts-file", "--output", "--max-tokens", "--temperature", "--stop"):
            assert flag in out
    if command == ["chat"]:
        assert "--system" in out and "--max-tokens" in out
    if command in (["generate"], ["chat"]):
        assert "--quant" in out
    if command == ["quantize"]:
        assert "--quant" in out and "--out" in out and "mxfp4" in out


def test_generate_prompt_prints_completion(capsys, model_dir, llm):
    prompt = "def fibonacci(n):"
    assert run_cli(["generate", model_dir, *ENGINE, "--prompt", prompt, "--max-tokens", "8", *GREEDY]) == 0
    out = capsys.readouterr().out
    assert out == prompt + complete(llm, prompt, 8).text + "\n"


def test_generate_with_load_time_mxfp4(capsys, model_dir):
    prompt = "def fibonacci(n):"
    assert run_cli(["generate", model_dir, *ENGINE, "--quant", "mxfp4", "--prompt", prompt, "--max-tokens", "8",
                    *GREEDY]) == 0
    expected = complete(LLM(model_dir, dtype=torch.float32, max_model_len=128, quantization="mxfp4"), prompt, 8)
    assert capsys.readouterr().out == prompt + expected.text + "\n"
    assert run_cli(["generate", model_dir, "--quant", "int3", "--prompt", prompt]) == 2


def test_generate_stop_string(capsys, model_dir, llm):
    prompt = "import os\n"
    text = complete(llm, prompt, 16).text
    # A substring whose first occurrence is where it was taken from.
    at = next(a for a in range(2, len(text) - 3) if "\ufffd" not in text[a : a + 3] and text.find(text[a : a + 3]) == a)
    assert run_cli(["generate", model_dir, *ENGINE, "--prompt", prompt, "--max-tokens", "16", *GREEDY,
                    "--stop", "never-there", "--stop", text[at : at + 3]]) == 0
    assert capsys.readouterr().out == prompt + text[:at] + "\n"


def test_generate_prompts_file_to_output(tmp_path, capsys, model_dir, llm):
    prompts = tmp_path / "prompts.jsonl"
    token_ids = [300, 301, 302, 303]
    lines = [
        json.dumps("def f(x):"),
        json.dumps({"prompt": "héllo 世界", "max_tokens": 3}),
        "",
        json.dumps({"prompt_token_ids": token_ids, "max_tokens": 2, "unknown_key": 1}),
        json.dumps({"prompt": "class A:\n", "temperature": 0.0}),
    ]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    argv = ["generate", model_dir, *ENGINE, "--prompts-file", str(prompts), "--output", str(output),
            "--max-tokens", "5", *GREEDY]
    assert run_cli(argv) == 0
    assert capsys.readouterr().out == ""
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["def f(x):", "héllo 世界", None, "class A:\n"]
    expected = [
        complete(llm, "def f(x):", 5),
        complete(llm, "héllo 世界", 3),
        complete(llm, {"prompt_token_ids": token_ids}, 2),
        complete(llm, "class A:\n", 5),
    ]
    for record, ref in zip(records, expected):
        assert record["token_ids"] == ref.token_ids
        assert record["text"] == ref.text
        assert record["finish_reason"] == "length"
    # The non-ASCII prompt is written as is (UTF-8), not escaped.
    assert "héllo 世界" in output.read_text(encoding="utf-8")

    # Without --output: the same JSONL on stdout.
    assert run_cli(argv[:-7] + ["--max-tokens", "5", *GREEDY]) == 0
    stdout_records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert stdout_records == records


def test_generate_prompt_with_output_file(tmp_path, capsys, model_dir, llm):
    output = tmp_path / "one.jsonl"
    argv = ["generate", model_dir, *ENGINE, "--prompt", "x = 1\n", "--max-tokens", "4", *GREEDY,
            "--output", str(output)]
    assert run_cli(argv) == 0
    assert capsys.readouterr().out == ""
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    ref = complete(llm, "x = 1\n", 4)
    assert record == {"prompt": "x = 1\n", "text": ref.text, "token_ids": ref.token_ids, "finish_reason": "length"}


def test_generate_deterministic(capsys, model_dir, llm):
    """--deterministic runs the batch-invariant kernels: the same greedy text."""
    prompt = "x = 1\n"
    assert run_cli(["generate", model_dir, *ENGINE, "--deterministic", "--prompt", prompt, "--max-tokens", "4",
                    *GREEDY]) == 0
    assert capsys.readouterr().out == prompt + complete(llm, prompt, 4).text + "\n"


def test_generate_structured_outputs(capsys, model_dir, tmp_path):
    """--structured-outputs constrains --prompt; a prompts file's line may carry its own structured_outputs."""
    assert run_cli(["generate", model_dir, *ENGINE, "--prompt", "x = ", "--max-tokens", "12", "--temperature", "1",
                    "--structured-outputs", '{"regex": "[0-9]{2,4}"}']) == 0
    assert re.fullmatch(r"x = [0-9]{2,4}\n", capsys.readouterr().out)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "ok?", "max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}}))
    output = tmp_path / "out.jsonl"
    assert run_cli(["generate", model_dir, *ENGINE, "--prompts-file", str(prompts), "--output", str(output)]) == 0
    assert json.loads(output.read_text())["text"] in ("yes", "no")


def test_sample_seed_is_reproducible(capsys, model_dir):
    argv = ["generate", model_dir, *ENGINE, "--prompt", "def f():", "--max-tokens", "12", "--ignore-eos",
            "--temperature", "1.0"]
    outs = []
    for seed in ("3", "3", "4"):
        assert run_cli([*argv, "--sample-seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--prompt", ""], "empty"),
        (["--prompt", "x " * 200], "max_model_len"),
        (["--prompt", "x", "--max-tokens", "0"], "max_tokens"),
        (["--prompt", "x", "--max-tokens", "-5"], "max_tokens"),
        # As the server's 400: the output would stop at the context limit, short of max_tokens.
        (["--prompt", "x", "--max-tokens", "5000"], "max_tokens is 5000: more than the context length (128)"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--block-size", "0"], "block_size"),
        (["--prompt", "x", "--dtype", "float8"], "dtype"),
        (["--prompt", "x", "--kv-cache-memory", "0.0000001"], "KV cache"),
        (["--prompt", "x", "--deterministic", "--kernel-backend", "triton"], "deterministic"),
        (["--prompt", "x", "--structured-outputs", "{"], "not JSON"),
        (["--prompt", "x", "--structured-outputs", "[1]"], "JSON object"),
        (["--prompt", "x", "--structured-outputs", '{"regexp": "a"}'], "keys are"),
        (["--prompt", "x", "--structured-outputs", '{"regex": "[0-9"}'], "invalid regex"),
    ],
    ids=["empty-prompt", "too-long", "max-tokens-0", "max-tokens-neg", "max-tokens-past-context", "top-p-big",
         "top-p-0", "temp-neg", "block-size-0", "dtype", "kv-too-small", "deterministic-triton", "structured-not-json",
         "structured-not-object", "structured-unknown-key", "structured-bad-regex"],
)
def test_generate_user_errors(capsys, model_dir, args, match):
    assert_one_line_error(capsys, ["generate", model_dir, *ENGINE, *args], match)


def test_model_path_errors(capsys, tmp_path):
    assert_one_line_error(capsys, ["generate", str(tmp_path / "missing" / "model"), "--prompt", "x"], "not a folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(capsys, ["generate", str(tmp_path / "empty"), "--prompt", "x"], "config.json")
    assert_one_line_error(capsys, ["chat", str(tmp_path / "empty")], "config.json", command="chat")


def test_prompts_file_errors(capsys, tmp_path, model_dir):
    base = ["generate", model_dir, *ENGINE, "--prompts-file"]
    assert_one_line_error(capsys, [*base, str(tmp_path / "nope.jsonl")], "cannot read prompts file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{not json\n')
    assert_one_line_error(capsys, [*base, str(bad)], "bad.jsonl:2: not JSON")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "x"}\n')
    assert_one_line_error(capsys, [*base, str(wrong)], "wrong.jsonl:1: expected")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert_one_line_error(capsys, [*base, str(empty)], "holds no prompts")
    bad_param = tmp_path / "bad_param.jsonl"
    bad_param.write_text('{"prompt": "x", "top_p": 2}\n')
    assert_one_line_error(capsys, [*base, str(bad_param)], "top_p")
    past_context = tmp_path / "past_context.jsonl"
    past_context.write_text('"x"\n{"prompt": "x", "max_tokens": 500}\n')
    assert_one_line_error(capsys, [*base, str(past_context)], "past_context.jsonl, prompt 2: The prompt has 1 tokens "
                                                             "and max_tokens is 500")


def test_usage_errors_exit_2(capsys, model_dir):
    assert run_cli(["generate", model_dir]) == 2  # neither --prompt nor --prompts-file
    assert run_cli(["generate", model_dir, "--prompt", "x", "--prompts-file", "f"]) == 2
    assert run_cli(["no-such-command"]) == 2
    assert run_cli([]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_chat(capsys, monkeypatch, model_dir, llm):
    replies = iter(["hello", "again"])

    def fake_input(prompt=""):
        try:
            return next(replies)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert run_cli(["chat", model_dir, *ENGINE, "--max-tokens", "4", *GREEDY, "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    # The streamed pieces add up to the replies the LLM API gives for the same conversation.
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    first = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
    second = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    assert out == first + "\n" + second + "\n" + "\n"  # each reply, then a newline at end of input


def test_chat_response_format(capsys, monkeypatch, model_dir):
    replies = iter(["a point?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(replies))
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT}}
    assert run_cli(["chat", model_dir, *ENGINE, "--max-tokens", "32", "--sample-seed", "1", "--temperature", "1",
                    "--response-format", json.dumps(response_format)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), POINT)


@pytest.mark.parametrize("args, match", [
    (["--response-format", '{"type": "xml"}'], "response_format.type"),
    (["--response-format", "[]"], "JSON object"),
    (["--response-format", '{"type": "json_object"}', "--structured-outputs", '{"regex": "a"}'], "not both"),
], ids=["unknown-type", "not-object", "both"])
def test_chat_response_format_errors(capsys, model_dir, args, match):
    assert_one_line_error(capsys, ["chat", model_dir, *ENGINE, *args], match, command="chat")


def test_chat_without_template_is_a_user_error(capsys, monkeypatch, model_dir, tmp_path):
    import shutil

    plain = tmp_path / "no-template"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("asked for input"))
    assert_one_line_error(capsys, ["chat", str(plain), *ENGINE], "chat_template", command="chat")


def test_chat_empty_line_exits(capsys, monkeypatch, model_dir):
    monkeypatch.setattr("builtins.input", lambda prompt="": "")
    assert run_cli(["chat", model_dir, *ENGINE]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("model", ["local", "hub-id"])
def test_python_dash_m_error_is_one_line(tmp_path, model):
    """`python -m microscale` in a fresh process: a model that is neither a folder nor (offline) on the hub is
    exit code 2 and one line, no traceback."""
    path = str(tmp_path / "missing" / "model") if model == "local" else "no-such-org/no-such-model"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "microscale", "generate", path, "--prompt", "x"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("microscale generate: error: Model ")


def test_eval_ppl_and_compare_json(capsys, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text(VALID_TEXT.read_text()[:4000])
    model = str(BUNDLED_MODEL)
    base = [model, "--dtype", "float32", "--max-model-len", "128", "--data", str(data), "--json"]
    assert run_cli(["eval", "ppl", *base]) == 0
    ppl = json.loads(capsys.readouterr().out)
    assert ppl["tokens"] > 500 and 1 < ppl["perplexity"] < 1000 and (ppl["context"], ppl["stride"]) == (128, 64)
    assert run_cli(["eval", "compare", *base, "--kv-cache-quant", "int8"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("kl_mean", "top1_agreement", "ppl_ref", "ppl_quant", "ppl_delta_pct"):
        assert key in result
    assert result["ppl_ref"] == pytest.approx(ppl["perplexity"])
    assert run_cli(["eval", "compare", *base[:-1], "--quant", "fp8-dynamic"]) == 0
    assert "top-1 agreement" in capsys.readouterr().out
    assert_one_line_error(capsys, ["eval", "compare", *base], "needs --quant", command="eval")
    assert_one_line_error(capsys, ["eval", "ppl", model, "--data", str(tmp_path / "nope")], "cannot read",
                          command="eval")


def test_quantize_fp8_with_verify(capsys, tmp_path):
    text = VALID_TEXT.read_text()
    (tmp_path / "calib.txt").write_text(text[-20000:])
    (tmp_path / "heldout.txt").write_text(text[:3000])
    out = tmp_path / "fp8"
    assert run_cli(["quantize", str(BUNDLED_MODEL), "--quant", "fp8", "--out", str(out), "--dtype", "float32",
                    "--max-model-len", "128", "--calib-data", str(tmp_path / "calib.txt"), "--calib-batches", "4",
                    "--kv-cache-quant", "fp8", "--verify", "--verify-data", str(tmp_path / "heldout.txt")]) == 0
    assert "perplexity delta" in capsys.readouterr().out
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["quant"] == "fp8" and abs(accuracy["ppl_delta_pct"]) < 5
    assert "top-1 agreement" in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["kv_cache_scheme"]["type"] == "float"
    reloaded = LLM(str(out), dtype="float32", max_model_len=128)
    assert reloaded.engine.runner.kv_cache_description() == "fp8 e4m3, per-tensor scales"
    assert_one_line_error(capsys, ["quantize", str(BUNDLED_MODEL), "--quant", "fp8", "--out", str(tmp_path / "x"),
                                   "--verify"], "--verify-data", command="quantize")
    assert_one_line_error(capsys, ["quantize", str(BUNDLED_MODEL), "--quant", "fp8", "--out", str(tmp_path / "y")],
                          "calibration", command="quantize")


def test_speculative_config_flag(capsys, model_dir):
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'
    assert run_cli(["generate", model_dir, *ENGINE, "--prompt", "x = 1\nx = 1\nx =", "--max-tokens", "8",
                    "--speculative-config", spec]) == 0
    assert_one_line_error(capsys, ["generate", model_dir, *ENGINE, "--prompt", "x", "--speculative-config", "{bad"],
                          "speculative_config is not valid JSON")
    assert_one_line_error(capsys, ["generate", model_dir, *ENGINE, "--prompt", "x", "--speculative-config",
                                   '{"method": "ngram", "num_speculative_tokens": 0}'],
                          "num_speculative_tokens must be a positive integer")
