"""Make models/tiny-llama-pycode-draft: a 2-layer draft of the bundled tiny-llama-pycode for speculative decoding.

What it does, offline and on CPU:
  1. the training text is the bundled model's own: every UTF-8 *.py file of this Python's standard library
     (site-packages excluded), less the held-out files of data/pycode-valid.txt (the same split rule as
     ../shared/tools/train_tiny_models.py: files ranked by SHA-256 of their path), joined by <|endoftext|> and
     encoded with the bundled model's tokenizer;
  2. the draft starts as the target with layers removed: its embeddings, final norm and LM head, and two of its
     six decoder layers (the first and the last, which keeps the input and output ends of the residual stream);
  3. it is distilled: the loss is the KL divergence from the target's next-token distribution to the draft's at
     every position (what makes the draft propose what the target would accept), plus a small cross-entropy on
     the real next token; AdamW, warmup + cosine, one thread;
  4. it saves bfloat16 safetensors with the target's tokenizer files, then measures with microscale: validation
     perplexity, the top-1 agreement with the target on held-out text, and greedy speculative decoding's
     acceptance rate on held-out prompts; the numbers go into the model card README.md.

Re-run (about 15 minutes on one core; every seed fixed):
    PYTHONPATH=. python tools/train_draft_model.py
    PYTHONPATH=. python tools/train_draft_model.py --eval-only      # measure an existing folder again
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "models" / "tiny-llama-pycode"
OUT = REPO / "models" / "tiny-llama-pycode-draft"
VALID = REPO / "data" / "pycode-valid.txt"
EOS = "<|endoftext|>"
KEPT_LAYERS = (0, 5)
SEED = 4321
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 *.py file of the stdlib, sorted by path (as the target's data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages/" in rel or "__pycache__" in rel:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if EOS not in text and text.strip():
            files.append((rel, text))
    return files


def held_out(files: list[tuple[str, str]], frac: float = 0.02, max_file_bytes: int = 32_000,
             max_total_bytes: int = 330_000) -> set[str]:
    """The validation files of the target's split: the top of the SHA-256 ranking of paths, skipping large files
    and encodings/, until ~frac of the files or ~max_total_bytes."""
    wanted = max(1, round(frac * len(files)))
    chosen, total = set(), 0
    for rel, text in sorted(files, key=lambda f: hashlib.sha256(f[0].encode()).hexdigest()):
        if len(chosen) >= wanted or total >= max_total_bytes - 8_000:
            break
        size = len(text.encode())
        if size > max_file_bytes or rel.startswith("encodings/") or total + size > max_total_bytes:
            continue
        chosen.add(rel)
        total += size
    return chosen


def training_ids(tokenizer) -> np.ndarray:
    files = stdlib_files()
    valid = held_out(files)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for rel, text in files:
        if rel not in valid:
            ids += tokenizer.encode(text, add_special_tokens=False) + [eos]
    return np.asarray(ids, dtype=np.int64)


def draft_from_target(target):
    """A copy of the target keeping KEPT_LAYERS only (embeddings, norm and LM head shared by value)."""
    from transformers import LlamaForCausalLM

    config = type(target.config).from_dict(target.config.to_dict())
    config.num_hidden_layers = len(KEPT_LAYERS)
    draft = LlamaForCausalLM(config)
    state = target.state_dict()
    renamed = {}
    for name, tensor in state.items():
        if ".layers." not in name:
            renamed[name] = tensor.clone()
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        if layer in KEPT_LAYERS:
            new = KEPT_LAYERS.index(layer)
            renamed[name.replace(f".layers.{layer}.", f".layers.{new}.")] = tensor.clone()
    draft.load_state_dict(renamed)
    return draft


def lr_at(progress: float, peak: float, warmup: float = 0.05, min_ratio: float = 0.1) -> float:
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    p = (progress - warmup) / (1 - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def distill(target, draft, ids: np.ndarray, args) -> dict:
    rng = np.random.default_rng(SEED)
    span = args.seq_len + 1
    starts = rng.integers(0, len(ids) - span, size=(args.steps, args.batch_size))
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    target.eval()
    draft.train()
    began, ema = time.time(), None
    for step in range(args.steps):
        batch = torch.from_numpy(np.stack([ids[s : s + span] for s in starts[step]]))
        inputs, labels = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            teacher = target(input_ids=inputs, use_cache=False).logits.float().log_softmax(-1)
        logits = draft(input_ids=inputs, use_cache=False).logits.float()
        student = logits.log_softmax(-1)
        kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean") / args.seq_len
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss = kl + args.ce_weight * ce
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step / args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        ema = kl.item() if ema is None else 0.98 * ema + 0.02 * kl.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} kl {kl.item():.4f} (ema {ema:.4f}) ce {ce.item():.3f} "
                  f"{time.time() - began:.0f}s", flush=True)
    return {"steps": args.steps, "batch": f"{args.batch_size} x {args.seq_len}", "lr": args.lr,
            "ce_weight": args.ce_weight, "final_kl_ema": round(ema, 4), "minutes": round((time.time() - began) / 60, 1)}


def save(draft, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    draft.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    config["rope_scaling"] = None
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(TARGET / name, out / name)


def measure(out: Path, prompts: int, max_tokens: int) -> dict:
    """Perplexity and top-1 agreement with the target on held-out text, and greedy acceptance in microscale."""
    from microscale import LLM, SamplingParams

    text = VALID.read_text()
    target = LLM(str(TARGET), dtype="float32")
    draft = LLM(str(out), dtype="float32")
    ids = target.get_tokenizer().encode(text, add_special_tokens=False)
    windows = [ids[s : s + 512] for s in range(0, len(ids) - 512, 512)][:40]
    nll = agree = count = 0
    for window in windows:
        t = target.engine.prompt_logits(window)[:-1]
        d = draft.engine.prompt_logits(window)[:-1]
        labels = torch.tensor(window[1:])
        nll += torch.nn.functional.cross_entropy(d, labels, reduction="sum").item()
        agree += (t.argmax(-1) == d.argmax(-1)).sum().item()
        count += len(labels)
    stride = len(text) // prompts
    prompt_texts = [text[i * stride : i * stride + 400] for i in range(prompts)]
    spec = {"method": "draft", "model": str(out), "num_speculative_tokens": 4}
    speculating = LLM(str(TARGET), dtype="float32", speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in target.generate(prompt_texts, params, use_tqdm=False)]
    fast = [o.outputs[0].token_ids for o in speculating.generate(prompt_texts, params, use_tqdm=False)]
    stats = speculating.engine.get_stats()
    drafts, proposed, accepted = (stats[f"spec_decode_num_{k}"] for k in ("drafts", "draft_tokens", "accepted_tokens"))
    return {"perplexity": round(math.exp(nll / count), 2), "top1_agreement": round(agree / count, 4),
            "tokens": count, "acceptance_rate": round(accepted / proposed, 4),
            "tokens_per_verification": round(1 + accepted / drafts, 2),
            "greedy_equal": f"{sum(a == b for a, b in zip(plain, fast))}/{len(plain)}", "prompts": prompts,
            "max_tokens": max_tokens}


def write_card(out: Path, training: dict, report: dict) -> None:
    params = sum(np.prod(shape) for shape in _shapes(out))
    (out / "README.md").write_text(f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [tiny, draft-model, speculative-decoding, python, code]
---

# tiny-llama-pycode-draft

A draft model for **speculative decoding** of the bundled `tiny-llama-pycode` (same tokenizer, same vocabulary of
4096): `LlamaForCausalLM` with **2 decoder layers** (the target has 6), hidden 256, 8 query / 2 KV heads (head_dim
32), SwiGLU 768, untied embeddings; {params:,} parameters in bfloat16. Made by `tools/train_draft_model.py`.

## How it was made
It starts as the target with layers {list(KEPT_LAYERS)} kept (embeddings, final norm and LM head copied) and is
distilled from the target on the target's own training text (the CPython 3.11 standard library less the held-out
files of `data/pycode-valid.txt`): loss = KL(target || draft) per token + {training['ce_weight']} x cross-entropy,
AdamW, peak LR {training['lr']}, warmup + cosine, batch {training['batch']} tokens, {training['steps']} steps
({training['minutes']} min on one CPU core); final KL (EMA) {training['final_kl_ema']} nats/token.

## Measured (microscale, float32, held-out `data/pycode-valid.txt`)

| what | value |
| --- | --- |
| perplexity of the draft ({report['tokens']:,} tokens, 512-token windows) | {report['perplexity']} (target: 84.95) |
| top-1 agreement with the target, per position | {report['top1_agreement']:.1%} |
| greedy speculative decoding, k = 4: drafts accepted | {report['acceptance_rate']:.1%} |
| tokens per verification step | {report['tokens_per_verification']} |
| greedy outputs equal with and without speculation | {report['greedy_equal']} |

(Acceptance over {report['prompts']} held-out prompts of 400 characters, {report['max_tokens']} new tokens each.)

Use: `LLM("models/tiny-llama-pycode", speculative_config={{"method": "draft", "model":
"models/tiny-llama-pycode-draft", "num_speculative_tokens": 4}})`. It is useless on its own.
""")


def _shapes(out: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        return [tuple(f.get_slice(name).get_shape()) for name in f.keys()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--eval-max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    training_file = args.out / "training.json"
    if not args.eval_only:
        from transformers import AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(TARGET)
        ids = training_ids(tokenizer)
        print(f"{len(ids):,} training tokens", flush=True)
        target = LlamaForCausalLM.from_pretrained(TARGET, dtype=torch.float32)
        draft = draft_from_target(target)
        training = distill(target, draft, ids, args)
        save(draft, args.out)
        training_file.write_text(json.dumps(training, indent=2) + "\n")
    training = json.loads(training_file.read_text())
    report = measure(args.out, args.eval_prompts, args.eval_max_tokens)
    print(json.dumps(report), flush=True)
    write_card(args.out, training, report)


if __name__ == "__main__":
    main()
