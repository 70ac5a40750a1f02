"""`microscale` command line: generate, chat, serve, bench, quantize, eval, monitor, plan."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

from microscale.bench import BenchError
from microscale.bench.cli import add_bench_parser
from microscale.command_parser import CommandParser
from microscale.config import EngineArgs
from microscale.engine.inputs import InputProcessor
from microscale.engine_flags import add_engine_flags, engine_kwargs
from microscale.jsonl import json_lines
from microscale.peer_names import ENGINE, SERVE, add_peer_flags, translate_command
from microscale.quant.format import exportable_weight_formats, weight_format
from microscale.quant.kv_cache import KV_CACHES
from microscale.sampling_params import SamplingParams, StructuredOutputsParams
from microscale.serve.stats_log import DEFAULT_INTERVAL_S as DEFAULT_STATS_INTERVAL_S


class CLIError(Exception):
    """A user error worth one line on stderr, not a traceback."""


# `quantize` takes the engine's KV cache and calibration flags; its --quant is the checkpoint format.
_QUANTIZE_ENGINE_FLAGS = ("kv_cache_quant", "calib_config")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    groups = add_engine_flags(p)
    groups["engine"].add_argument("-v", "--verbose", action="store_true",
                                  help="log engine details (KV cache size, ...)")
    add_peer_flags(p, ENGINE)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, default_note: str = "") -> None:
    g = p.add_argument_group("sampling")
    # None when not given: the command's default (args.default_max_tokens) applies, which generate may cut to what
    # the context holds.
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate (default {max_tokens}{default_note})")
    p.set_defaults(default_max_tokens=max_tokens)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 1)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--sample-seed", dest="sample_seed", type=int, default=None,
                   help="per-request sampling seed (reproducible samples)")
    g.add_argument("--structured-outputs", default=None, metavar="JSON",
                   help='constrain the output, as the server\'s structured_outputs: e.g. '
                        '\'{"choice": ["yes", "no"]}\', \'{"json": SCHEMA}\', \'{"regex": "..."}\', '
                        '\'{"json_object": true}\', \'{"grammar": LARK}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="microscale", description="LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts (one, or a JSONL file of them)",
                         description="Complete a prompt, or every prompt of a JSONL file (with a progress bar).")
    _add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", help='JSONL: each line a string or {"prompt": ..., "max_tokens": ...}')
    gen.add_argument("--output", help="write JSONL results here (default: stdout)")
    _add_sampling_args(gen, max_tokens=128, default_note=", or what the context leaves after the prompt; a larger "
                                                      "--max-tokens than the context holds is an error")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streaming tokens as they come",
                          description="Chat with a model using its chat template; an empty line or Ctrl-D exits.")
    _add_engine_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--tools", default=None, metavar="FILE",
                      help="a JSON file of OpenAI-format tool definitions: the model may call them, and you type "
                           "each call's result")
    chat.add_argument("--tool-call-parser", default=None, choices=sorted(_tool_parser_names()),
                      help="the model's tool-call format (default: the one its chat template writes)")
    _add_sampling_args(chat, max_tokens=256)
    chat.add_argument("--response-format", default=None, metavar="JSON",
                      help='OpenAI\'s response_format for every answer: \'{"type": "json_object"}\' or '
                           '\'{"type": "json_schema", "json_schema": {"name": ..., "schema": SCHEMA}}\'')
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                           description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                       "/v1/responses, /v1/models) and vLLM's extras (/tokenize, /detokenize, "
                                       "/tokenizer_info, /metrics, /health, /version); streams with Server-Sent "
                                       "Events. `microscale serve api_server MODEL` (LMDeploy's words) is the same.")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=23333, help="port to listen on (default 23333)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the model folder's name, or the hub id)")
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(_tool_parser_names()),
                       help="the model's tool-call format (default: the one its chat template writes; "
                            "openai = harmony, vLLM's name for gpt-oss)")
    serve.add_argument("--max-waiting", type=int, default=None, metavar="N",
                       help="answer 503 (Retry-After) while N requests wait for a slot (default: no limit)")
    _add_serve_limit_args(serve)
    add_peer_flags(serve, SERVE)
    serve.add_argument("--engine-restarts", type=int, default=3, metavar="N",
                       help="restart the engine process up to N times after a fault, then exit 1 (default 3)")
    serve.add_argument("--shutdown-drain-seconds", type=float, default=30, metavar="SECONDS",
                       help="on SIGTERM, let streams finish for this long before ending them (default 30)")
    logs = serve.add_argument_group("logging")
    logs.add_argument("--log-stats-interval", type=float, default=DEFAULT_STATS_INTERVAL_S, metavar="SECONDS",
                      help="seconds between stats lines (throughput, running and waiting requests, KV cache usage; "
                           f"default {DEFAULT_STATS_INTERVAL_S:g})")
    logs.add_argument("--disable-log-stats", action="store_true", help="no periodic stats line")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="no access line (client, method, path, status) per request")
    serve.set_defaults(func=cmd_serve)

    add_bench_parser(sub)

    mon = sub.add_parser("monitor", help="live terminal dashboard of a running server's /metrics",
                         description="Poll a microscale server's /metrics and show load, throughput and latencies.")
    mon.add_argument("--server", default="http://127.0.0.1:23333", help="server URL (default http://127.0.0.1:23333)")
    mon.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    mon.add_argument("--window", type=float, default=60.0, help="seconds of history for latency quantiles (default 60)")
    mon.add_argument("--once", action="store_true",
                     help="print one snapshot and exit (rates over one interval, latencies since the server started)")
    mon.set_defaults(func=cmd_monitor, verbose=False)

    plan = sub.add_parser("plan", help="will it fit: memory per rank from config.json alone",
                          description="Plan one rank's memory from the model's config.json and the engine options, "
                                      "reading no weights: weights by component and precision, activations, CUDA "
                                      "graphs, KV bytes per token, how many tokens and full-length sequences fit, "
                                      "and a verdict (exit status 1 when it does not fit).")
    _add_engine_args(plan)
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                      help="plan for a device of this many GiB (default: this machine's GPU, a GPU named by "
                           "--device H100/H200/H800/A100/L40S/L4/B200, or the host's RAM with --device cpu)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    quant = sub.add_parser("quantize", help="write a pre-quantized checkpoint",
                           description="Quantize a 16/32-bit checkpoint and write it as a Hugging Face folder: "
                                       "mxfp4 (gpt-oss-style MXFP4 MoE experts), fp8 / fp8-dynamic "
                                       "(compressed-tensors naming, as vLLM loads).")
    quant.add_argument("model", help="local Hugging Face model folder")
    quant.add_argument("--quant", required=True, choices=exportable_weight_formats(), help="checkpoint format")
    quant.add_argument("--out", required=True, help="output folder (new or empty)")
    quant.add_argument("--dtype", default="auto", help="dtype to calibrate in (default: the checkpoint's)")
    quant.add_argument("--device", default=None, help="cpu or cuda")
    quant.add_argument("--max-model-len", type=int, default=None)
    add_engine_flags(quant, only=_QUANTIZE_ENGINE_FLAGS)
    quant.add_argument("--verify", action="store_true",
                       help="compare the written checkpoint with the original on --verify-data; the figures go "
                            "into the output folder's README.md and accuracy.json")
    quant.add_argument("--verify-data", default=None, metavar="FILE", help="held-out text for --verify")
    quant.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the data")
    quant.add_argument("-v", "--verbose", action="store_true", help="log progress")
    quant.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="accuracy: perplexity, quantized vs reference",
                        description="Perplexity of a model on a text, or a quantized model against the "
                                    "unquantized one.")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    for name, helptext in (("ppl", "perplexity over a text file (sliding window)"),
                           ("compare", "quantized vs unquantized: KL, top-1 agreement, perplexity delta")):
        e = ev_sub.add_parser(name, help=helptext, description=helptext)
        _add_engine_args(e)
        e.add_argument("--data", required=True, metavar="FILE", help="text file to score")
        e.add_argument("--max-chars", type=int, default=None, help="use only the first N characters")
        e.add_argument("--context", type=int, default=None, help="window in tokens (default: max-model-len or 1024)")
        e.add_argument("--stride", type=int, default=None, help="window step in tokens (default: context / 2)")
        e.add_argument("--json", action="store_true", help="print one JSON object")
        e.set_defaults(func=cmd_eval_ppl if name == "ppl" else cmd_eval_compare)
    return parser


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "stop": args.stop,
        "seed": args.sample_seed,
    }
    overrides = {k: v for k, v in values.items() if v is not None}
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    if args.structured_outputs is not None:
        overrides["structured_outputs"] = _json_object(args.structured_outputs, "--structured-outputs",
                                                       '{"choice": ["yes", "no"]}')
    return overrides


def _json_object(value: str, flag: str, example: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise CLIError(f"{flag} is not JSON: {e.msg}.") from None
    if not isinstance(parsed, dict):
        raise CLIError(f"{flag} takes a JSON object, e.g. '{example}'.")
    return parsed


def _read_prompts_file(path: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise CLIError(f"cannot read prompts file: {e}") from None
    sampling_keys = {f.name for f in fields(SamplingParams) if f.init}
    for number, item in json_lines(text, path):
        if isinstance(item, str):
            yield item, {}
        elif isinstance(item, dict) and ("prompt" in item or "prompt_token_ids" in item):
            prompt = {k: item[k] for k in ("prompt", "prompt_token_ids") if k in item}
            yield prompt, {k: v for k, v in item.items() if k in sampling_keys}
        else:
            raise CLIError(f'{path}:{number}: expected a string or an object with "prompt" or "prompt_token_ids"')


def cmd_generate(args: argparse.Namespace) -> None:
    from microscale.llm import LLM

    overrides = _sampling_overrides(args)
    if args.prompt is not None:
        prompts, per_prompt = [args.prompt], [{}]
    else:
        pairs = list(_read_prompts_file(args.prompts_file))
        if not pairs:
            raise CLIError(f"{args.prompts_file} holds no prompts")
        prompts, per_prompt = [p for p, _ in pairs], [o for _, o in pairs]
    # Checked before the model loads.
    inputs = InputProcessor(EngineArgs(model=args.model, **engine_kwargs(args)))
    params = _prompt_params(inputs, prompts, [{**overrides, **own} for own in per_prompt], args.default_max_tokens,
                            args.prompts_file)
    llm = LLM(args.model, **engine_kwargs(args))
    outputs = llm.generate(prompts, params, use_tqdm=args.prompts_file is not None)
    if args.prompt is not None and args.output is None:
        print(args.prompt + outputs[0].outputs[0].text)
        return
    sink = open(args.output, "w", encoding="utf-8") if args.output else contextlib.nullcontext(sys.stdout)
    with sink as out:
        for o in outputs:
            c = o.outputs[0]
            record = {"prompt": o.prompt, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _prompt_params(
    inputs: InputProcessor, prompts: list[Any], settings: list[dict[str, Any]], default_max_tokens: int,
    path: str | None,
) -> list[SamplingParams]:
    """Each prompt's SamplingParams from its settings, refusing what the engine would, and (with the server's 400
    message) a max_tokens the context cannot hold after the prompt: the output would stop short of it, at the
    context limit. Without max_tokens, a prompt gets default_max_tokens or the room left, as the server's default."""
    params = []
    for number, (prompt, own) in enumerate(zip(prompts, settings), 1):
        _, ids = inputs.tokenize_prompt(prompt)
        try:
            inputs.validate_prompt(ids)
            if "max_tokens" in own:
                params.append(inputs.default_sampling_params(**own))
                inputs.check_max_tokens(len(ids), params[-1].max_tokens)
            else:
                room = inputs.max_model_len - len(ids)
                params.append(inputs.default_sampling_params(**own, max_tokens=min(default_max_tokens, room)))
        except ValueError as e:
            raise CLIError(f"{path}, prompt {number}: {e}" if path else str(e)) from None
    return params


def cmd_chat(args: argparse.Namespace) -> None:
    from microscale.engine.engine import LLMEngine
    from microscale.serve.tool_parsers import reply_parser, template_arguments, tool_family

    tools = _read_tools(args.tools) if args.tools else None
    overrides = _sampling_overrides(args)
    if args.response_format is not None:
        if "structured_outputs" in overrides:
            raise CLIError("give --response-format or --structured-outputs, not both")
        overrides["structured_outputs"] = StructuredOutputsParams.from_response_format(
            _json_object(args.response_format, "--response-format", '{"type": "json_object"}'))
    engine = LLMEngine(EngineArgs(model=args.model, **engine_kwargs(args)))
    tokenizer = engine.tokenizer
    if not tokenizer.chat_template:
        raise CLIError("this model's tokenizer_config.json has no chat_template; use `microscale generate`")
    try:
        family = tool_family(tokenizer, args.tool_call_parser)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if tools and family is None:
        raise CLIError("this model's chat template writes no tool-call format microscale knows; "
                       "give --tool-call-parser")
    parser = reply_parser(tokenizer, family, with_tools=bool(tools))
    params = engine.inputs.default_sampling_params(**{"max_tokens": args.default_max_tokens, **overrides})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turns = itertools.count()
    print("microscale chat: an empty line or Ctrl-D exits.", file=sys.stderr)
    while True:
        user = _read_line("> ")
        if not user:
            return
        messages.append({"role": "user", "content": user})
        while True:  # until the model answers without calling a tool
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
            ids = tokenizer.encode(prompt, add_special_tokens=False)
            turn = next(turns)
            request = engine.add_request(f"chat-{turn}", {"prompt": prompt, "prompt_token_ids": ids}, params)
            reply = _stream_reply(engine, request.seqs[0], parser)
            if not reply.tool_calls:
                messages.append({"role": "assistant", "content": reply.content})
                break
            calls = [{"id": f"call_{turn}_{i}", "type": "function",
                      "function": {"name": c.name, "arguments": template_arguments(c.arguments)}}
                     for i, c in enumerate(reply.tool_calls)]
            messages.append({"role": "assistant", "tool_calls": calls,
                             **({"content": reply.content} if reply.content else {})})
            for call, made in zip(calls, reply.tool_calls):
                result = _read_line(f"[{made.name}({made.arguments})] result> ")
                if result is None:
                    return
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def _stream_reply(engine, seq, parser):
    """Run the request, printing the reply's content as it grows (reasoning dimmed, on stderr); its parse."""
    from microscale.serve.tool_parsers import ParsedReply

    shown = ParsedReply()
    while engine.has_unfinished_requests():
        engine.step()
        reply = parser.parse(seq.detokenizer.visible_text(seq.is_finished), seq.output_token_ids, seq.is_finished)
        if reasoning := reply.reasoning[len(shown.reasoning):]:
            print(f"\033[2m{reasoning}\033[0m", end="", file=sys.stderr, flush=True)
        print(reply.content[len(shown.content):], end="", flush=True)
        shown = reply
    print()
    return shown


def _read_line(prompt: str) -> str | None:
    """A stripped line from the user; None at Ctrl-D."""
    try:
        return input(prompt).strip()
    except EOFError:
        print()
        return None


def _read_tools(path: str) -> list[dict[str, Any]]:
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"--tools {path}: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "function" in t for t in tools):
        raise CLIError(f"--tools {path}: expected a JSON list of {{\"type\": \"function\", \"function\": {{...}}}}")
    return tools


def _tool_parser_names() -> list[str]:
    from microscale.serve.tool_parsers import PARSER_NAMES

    return list(PARSER_NAMES)


def _add_serve_limit_args(serve: argparse.ArgumentParser) -> None:
    from microscale.serve.limits import ServeLimits

    d = ServeLimits()
    serve.add_argument("--max-n", type=int, default=d.max_n, metavar="N",
                       help=f"most choices (n) one request may ask for (default {d.max_n})")
    serve.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, metavar="BYTES",
                       help=f"larger request bodies get 413, unread past the limit (default {d.max_request_bytes})")
    serve.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, metavar="N",
                       help=f"longer prompts (all messages together) get 400 before tokenizing "
                            f"(default {d.max_prompt_chars})")
    serve.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="SECONDS",
                       help=f"a request body not received in full by then gets 408 (default {d.body_timeout_s:g})")
    serve.add_argument("--header-timeout", type=float, default=d.header_timeout_s, metavar="SECONDS",
                       help="a connection whose request headers are not all in by then is closed "
                            f"(default {d.header_timeout_s:g})")
    serve.add_argument("--max-stored-responses", type=int, default=d.max_stored_responses, metavar="N",
                       help="most responses kept for /v1/responses retrieval and previous_response_id; the least "
                            f"recently used go first (default {d.max_stored_responses})")
    serve.add_argument("--max-stored-response-bytes", type=int, default=d.max_stored_response_bytes,
                       metavar="BYTES", help="most bytes (JSON) the stored responses and their conversations take "
                                             f"together (default {d.max_stored_response_bytes})")


def cmd_serve(args: argparse.Namespace) -> None:
    import signal

    from microscale.serve.app import build_app
    from microscale.serve.async_engine import AsyncEngine
    from microscale.serve.limits import ServeLimits
    from microscale.serve.server import LISTEN_BACKLOG, BindError, bind, serve

    if not args.log_stats_interval > 0:
        raise CLIError(f"--log-stats-interval must be positive, got {args.log_stats_interval:g}")
    try:
        sock = bind(args.host, args.port)  # before the model loads: a busy port fails now, not minutes later
    except BindError as e:
        raise CLIError(str(e)) from None
    engine = AsyncEngine(EngineArgs(model=args.model, **engine_kwargs(args)), args.max_waiting, args.engine_restarts,
                         served_model_name=args.served_model_name)
    engine.start()
    limits = ServeLimits(max_n=args.max_n, max_request_bytes=args.max_request_bytes,
                         max_prompt_chars=args.max_prompt_chars, body_timeout_s=args.body_timeout,
                         header_timeout_s=args.header_timeout, max_stored_responses=args.max_stored_responses,
                         max_stored_response_bytes=args.max_stored_response_bytes)
    app = build_app(engine, args.api_key, limits, args.tool_call_parser,
                    None if args.disable_log_stats else args.log_stats_interval)
    # The stats lines are INFO, shown without --verbose (as vLLM shows them).
    logging.getLogger("microscale.serve.stats_log").setLevel(logging.INFO)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler it found:
    # ignoring it there makes that shutdown exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    sock.listen(LISTEN_BACKLOG)
    print(f"microscale: serving {engine.served_model_name} at http://{args.host}:{args.port}/v1 "
          "(OpenAI API; /metrics, /health; Ctrl-C stops)", file=sys.stderr, flush=True)
    sys.exit(serve(app, engine, sock, args.shutdown_drain_seconds, "info" if args.verbose else "warning",
                   limits.header_timeout_s, access_log=not args.disable_log_requests))


def _run_as_torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun every rank runs the same command; ranks other than 0 serve rank 0's engine as
    tensor-parallel workers instead (and return once it shuts down)."""
    from microscale.distributed.launch import torchrun_rank
    from microscale.engine.worker import run_worker

    launched = torchrun_rank()
    if getattr(args, "tensor_parallel_size", 1) <= 1 or launched is None or launched[0] == 0:
        return False
    run_worker(EngineArgs(model=args.model, **engine_kwargs(args)), *launched)
    return True


def cmd_monitor(args: argparse.Namespace) -> None:
    from microscale.monitor.dashboard import run_monitor

    if args.interval <= 0 or args.window <= 0:
        raise CLIError("--interval and --window must be positive")
    sys.exit(run_monitor(args.server, args.interval, args.window, args.once))


def cmd_plan(args: argparse.Namespace) -> None:
    import torch

    from microscale.config import resolve_dtype
    from microscale.engine.plan import DeviceMemory, plan_memory
    from microscale.models.loader import load_model_config

    mem = DeviceMemory.named(args.device, args.gpu_memory)
    engine_args = EngineArgs(model=args.model, **{**engine_kwargs(args), "device": mem.kind})
    cfg = load_model_config(_config_folder(args.model))
    max_model_len = engine_args.max_model_len or cfg.max_position_embeddings
    dtype = resolve_dtype(engine_args.dtype, cfg.checkpoint_dtype, torch.device(mem.kind))
    result = plan_memory(engine_args, cfg, max_model_len, dtype, mem, Path(args.model).name)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.render())
    if not result.fits:
        sys.exit(1)


def _config_folder(model: str) -> Path:
    """A local model folder, or for a hub id the folder its config.json alone is downloaded to."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from microscale.models.loader import resolve_model_path

    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, "config.json")).parent
    except Exception:  # offline or not a hub id: the loader's own message says which
        return resolve_model_path(model)


def _read_data(path: str, max_chars: int | None) -> str:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e}") from None
    text = text[:max_chars] if max_chars else text
    if not text.strip():
        raise CLIError(f"{path} is empty")
    return text


def _window(args: argparse.Namespace, engine) -> tuple[int, int]:
    context = args.context or min(engine.scheduler_config.max_model_len, 1024)
    return context, args.stride or max(1, context // 2)


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    from microscale.engine.engine import LLMEngine
    from microscale.eval.perplexity import perplexity

    text = _read_data(args.data, args.max_chars)
    engine = LLMEngine(EngineArgs(model=args.model, **engine_kwargs(args)))
    context, stride = _window(args, engine)
    result = perplexity(engine, text, context, stride)
    record = {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
              "context": context, "stride": stride, "quant": args.quantization, "kv_cache_quant": args.kv_cache_quant}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of "
              f"{context}, stride {stride})")


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from microscale.engine.engine import LLMEngine
    from microscale.eval.compare import compare

    if not (args.quantization or args.kv_cache_quant):
        raise CLIError("compare needs --quant and/or --kv-cache-quant (what to compare against the reference)")
    text = _read_data(args.data, args.max_chars)
    kwargs = engine_kwargs(args)
    quantized = LLMEngine(EngineArgs(model=args.model, **kwargs))
    reference = LLMEngine(EngineArgs(
        model=args.model, **{**kwargs, "quantization": None, "kv_cache_quant": None, "calib_config": None}
    ))
    context, stride = _window(args, reference)
    result = compare(reference, quantized, text, context, stride)
    record = {**result.to_dict(), "quant": args.quantization, "kv_cache_quant": args.kv_cache_quant}
    print(json.dumps(record) if args.json else format_comparison(result, args.quantization, args.kv_cache_quant))


def format_comparison(result, quant: str | None, kv_cache_quant: str | None) -> str:
    name = " + ".join(f"{k} {v}" for k, v in (("weights", quant), ("KV cache", kv_cache_quant)) if v)
    rows = [
        ("scheme", name), ("tokens", str(result.tokens)), ("perplexity (reference)", f"{result.ppl_ref:.4f}"),
        ("perplexity (quantized)", f"{result.ppl_quant:.4f}"), ("perplexity delta", f"{result.ppl_delta_pct:+.3f}%"),
        ("mean KL (ref || quant)", f"{result.kl_mean:.6f}"), ("top-1 agreement", f"{result.top1_agreement:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from microscale.engine.engine import LLMEngine
    from microscale.eval.compare import compare
    from microscale.export import quantize_checkpoint, write_accuracy_report
    from microscale.models.loader import resolve_model_path

    if args.verify and not args.verify_data:
        raise CLIError("--verify needs --verify-data FILE (held-out text, not the calibration data)")
    if args.kv_cache_quant and not KV_CACHES.get(args.kv_cache_quant).checkpoint_scales:
        raise CLIError(f"checkpoints carry FP8 KV cache scales only; {args.kv_cache_quant} KV is a load-time option "
                       "(--kv-cache-quant)")
    model_dir, out_dir = resolve_model_path(args.model), Path(args.out)
    common = {"dtype": args.dtype, "device": args.device, "max_model_len": args.max_model_len}
    engine = None
    if weight_format(args.quant).exports_served_weights:
        engine = LLMEngine(EngineArgs(model=str(model_dir), quantization=args.quant, **common,
                                      **engine_kwargs(args, only=_QUANTIZE_ENGINE_FLAGS)))
    out = quantize_checkpoint(model_dir, out_dir, args.quant, engine)
    print(f"wrote {out}")
    if args.verify:
        del engine
        text = _read_data(args.verify_data, args.max_chars)
        reference = LLMEngine(EngineArgs(model=str(model_dir), **common))
        reloaded = LLMEngine(EngineArgs(model=str(out), **common))
        context = min(reference.scheduler_config.max_model_len, 1024)
        result = compare(reference, reloaded, text, context, context // 2)
        write_accuracy_report(out, result, args.verify_data, args.quant)
        print(format_comparison(result, args.quant, args.kv_cache_quant))


def main(argv: list[str] | None = None) -> None:
    # What a peer's name (LMDeploy's, vLLM's) set is said even without --verbose.
    logging.getLogger("microscale.peer_names").setLevel(logging.INFO)
    args = build_parser().parse_args(translate_command(sys.argv[1:] if argv is None else argv))
    logging.getLogger("microscale").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        if _run_as_torchrun_worker(args):
            return
        args.func(args)
    except (CLIError, ValueError, BenchError) as e:
        print(f"microscale {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
