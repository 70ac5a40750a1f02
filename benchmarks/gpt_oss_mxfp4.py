"""gpt-oss with MXFP4 experts: accuracy on the trained tiny model, memory, and a real-size decode run.

1. Accuracy: `microscale quantize` writes the MXFP4 checkpoint of models/tiny-gptoss-pycode; perplexity on
   data/pycode-valid.txt (consecutive windows of --context tokens) of the bf16 checkpoint and of the MXFP4 one,
   by microscale and by transformers (its own mxfp4 dequantisation) on the same windows.
2. Memory: resident bytes of the experts' storage vs the same weights in bf16.
3. Real size: configs/models/gpt-oss-20b with random (dummy) MXFP4 weights: load time, resident weight memory,
   and decode tokens/s at batch 1 and --batch on this machine.

    .venv/bin/python benchmarks/gpt_oss_mxfp4.py                 # everything (~14 GiB RAM for step 3)
    .venv/bin/python benchmarks/gpt_oss_mxfp4.py --skip-real-size
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from decode_timing import decode_tokens_per_s

from microscale import LLM
from microscale.eval.perplexity import perplexity
from microscale.export import quantize_checkpoint
from microscale.layers.moe import FusedMoE

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-gptoss-pycode"
TEXT = REPO / "data" / "pycode-valid.txt"
REAL = REPO / "configs" / "models" / "gpt-oss-20b"
TOKENIZER = REPO / "models" / "tiny-gptoss-pycode"  # any tokenizer: dummy weights, token ids only


def hf_perplexity(path: Path, ids: list[int], context: int, mxfp4: bool) -> float:
    import transformers

    kwargs = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if mxfp4 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            window = torch.tensor([ids[start : start + context]])
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(nll / count)


def expert_memory(llm: LLM) -> dict[str, float]:
    resident = bf16 = 0
    for module in llm.engine.runner.model.modules():
        if isinstance(module, FusedMoE):
            for name, param in module.named_parameters(recurse=False):
                size = param.numel() * param.element_size()
                if name.endswith("_blocks"):
                    bf16 += param.numel() * 2 * 2  # two values per byte, 2 bytes each
                if name.endswith(("_blocks", "_scales")):
                    resident += size
    total = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    other = total - resident
    return {"experts_resident_gib": resident / 2**30, "experts_bf16_gib": bf16 / 2**30,
            "ratio": resident / bf16, "other_weights_gib": other / 2**30, "all_weights_gib": total / 2**30}


def accuracy(context: int) -> dict:
    text = TEXT.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        mx = quantize_checkpoint(TINY, Path(tmp) / "mxfp4")
        rows = {}
        for label, path in (("bf16", TINY), ("mxfp4", mx)):
            llm = LLM(str(path), dtype="bfloat16", max_model_len=context, max_num_batched_tokens=context)
            result = perplexity(llm.engine, text, context=context)
            ids = llm.get_tokenizer().encode(text, add_special_tokens=False)
            rows[label] = {
                "microscale_ppl": result.perplexity,
                "transformers_ppl": hf_perplexity(path, ids, context, mxfp4=label == "mxfp4"),
                "tokens": result.tokens,
            }
            if label == "mxfp4":
                rows["memory"] = expert_memory(llm)
    return rows


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def real_size(batch: int, new_tokens: int) -> dict:
    started = time.perf_counter()
    llm = LLM(str(REAL), load_format="dummy", tokenizer=str(TOKENIZER), dtype="bfloat16", max_model_len=256,
              max_num_seqs=batch, kv_cache_memory=0.5)
    load_s = time.perf_counter() - started
    out = {"load_s": load_s, "rss_after_load_gib": rss_gib(), **expert_memory(llm)}
    prompt = list(range(1000, 1016))
    for n in sorted({1, batch}):
        out[f"decode_tok_s_batch{n}"] = decode_tokens_per_s(llm, [[t + i for t in prompt] for i in range(n)],
                                                            new_tokens)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-real-size", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "accuracy": accuracy(args.context)}
    acc = results["accuracy"]
    print(f"perplexity on {TEXT.name}, windows of {args.context} tokens ({acc['bf16']['tokens']} predicted), bf16:")
    print("| checkpoint | microscale | transformers |\n|---|---|---|")
    for label in ("bf16", "mxfp4"):
        print(f"| {label} | {acc[label]['microscale_ppl']:.3f} | {acc[label]['transformers_ppl']:.3f} |")
    mem = acc["memory"]
    print(f"tiny experts: {mem['ratio']:.4f}x the bf16 bytes")
    if not args.skip_real_size:
        results["gpt_oss_20b"] = real = real_size(args.batch, args.new_tokens)
        print(f"gpt-oss-20b dummy MXFP4: load {real['load_s']:.1f}s, weights {real['all_weights_gib']:.2f} GiB "
              f"(experts {real['experts_resident_gib']:.2f} GiB = {real['ratio']:.3f}x their bf16 "
              f"{real['experts_bf16_gib']:.2f} GiB; other {real['other_weights_gib']:.2f} GiB), "
              f"RSS {real['rss_after_load_gib']:.2f} GiB")
        for key, value in real.items():
            if key.startswith("decode"):
                print(f"  {key}: {value:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
