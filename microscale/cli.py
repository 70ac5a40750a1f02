"""`microscale` command line: generate, chat, quantize (the server, bench, eval and monitor commands join as
their issues land)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from microscale.config import EngineArgs
from microscale.quant import known_quant_methods
from microscale.quant.export import EXPORT_FORMATS
from microscale.sampling_params import SamplingParams


class CLIError(Exception):
    """A user error worth one line on stderr, not a traceback."""


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local Hugging Face model folder, or a hub id (org/name) when online")
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder, if not the model's (e.g. with dummy weights)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache size in GiB (CPU default: 4)")
    g.add_argument("--cache-max-entry-count", type=float, default=0.8, help="GPU: fraction of free memory for KV")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights of the right shapes (for benchmarks)")
    g.add_argument("--quant", dest="quantization", default=None, choices=known_quant_methods(),
                   help="weight quantization at load time (a pre-quantized checkpoint keeps its own format)")
    g.add_argument("--seed", type=int, default=0, help="global random seed")
    g.add_argument("-v", "--verbose", action="store_true", help="log engine details (KV cache size, ...)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 1)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--sample-seed", dest="sample_seed", type=int, default=None,
                   help="per-request sampling seed (reproducible samples)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microscale", description="LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts (one, or a JSONL file of them)",
                         description="Complete a prompt, or every prompt of a JSONL file (with a progress bar).")
    _add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", help='JSONL: each line a string or {"prompt": ..., "max_tokens": ...}')
    gen.add_argument("--output", help="write JSONL results here (default: stdout)")
    _add_sampling_args(gen, max_tokens=128)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat, streaming tokens as they come",
                          description="Chat with a model using its chat template; an empty line or Ctrl-D exits.")
    _add_engine_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat, max_tokens=256)
    chat.set_defaults(func=cmd_chat)

    quant = sub.add_parser("quantize", help="write a pre-quantized checkpoint",
                           description="Quantize a 16/32-bit checkpoint and write it as a Hugging Face folder "
                                       "(mxfp4: gpt-oss-style MXFP4 MoE experts, loadable by transformers too).")
    quant.add_argument("model", help="local Hugging Face model folder")
    quant.add_argument("--quant", required=True, choices=list(EXPORT_FORMATS), help="checkpoint format")
    quant.add_argument("--out", required=True, help="output folder (new or empty)")
    quant.add_argument("-v", "--verbose", action="store_true", help="log progress")
    quant.set_defaults(func=cmd_quantize)
    return parser


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(EngineArgs) if f.name != "model"}


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "stop": args.stop,
        "seed": args.sample_seed,
    }
    overrides = {k: v for k, v in values.items() if v is not None}
    if args.ignore_eos:
        overrides["ignore_eos"] = True
    return overrides


def _read_prompts_file(path: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise CLIError(f"cannot read prompts file: {e}") from None
    sampling_keys = {f.name for f in fields(SamplingParams) if f.init}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{number}: not JSON ({e.msg})") from None
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
    llm = LLM(args.model, **_engine_kwargs(args))
    params = [llm.engine.default_sampling_params(**{**overrides, **own}) for own in per_prompt]
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


def cmd_chat(args: argparse.Namespace) -> None:
    from microscale.engine.engine import LLMEngine

    engine = LLMEngine(EngineArgs(model=args.model, **_engine_kwargs(args)))
    if not engine.tokenizer.chat_template:
        raise CLIError("this model's tokenizer_config.json has no chat_template; use `microscale generate`")
    params = engine.default_sampling_params(**_sampling_overrides(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    turn = 0
    print("microscale chat: an empty line or Ctrl-D exits.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            print()
            return
        if not user.strip():
            return
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        request = engine.add_request(f"chat-{turn}", {"prompt": prompt, "prompt_token_ids": ids}, params)
        turn += 1
        seq = request.seqs[0]
        while engine.has_unfinished_requests():
            engine.step()
            print(seq.detokenizer.new_text(seq.is_finished), end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": seq.detokenizer.output_text})


def cmd_quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from microscale.models.loader import resolve_model_path
    from microscale.quant.export import quantize_checkpoint

    out = quantize_checkpoint(resolve_model_path(args.model), Path(args.out), args.quant)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.getLogger("microscale").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        args.func(args)
    except (CLIError, ValueError) as e:
        print(f"microscale {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
