"""Quantization: resident weight bytes per scheme, KV cache tokens per GiB per KV dtype, and decode speed on
this machine, for tiny-llama-pycode and (dummy weights) the real Llama-3.1-8B shape.

    .venv/bin/python benchmarks/quant_memory_speed.py                 # ~16 GiB RAM for the 8B part
    .venv/bin/python benchmarks/quant_memory_speed.py --skip-8b

Speed here is CPU speed. At decode batch sizes (up to 8 tokens) FP8 and MXFP4 weights are decoded in vector
registers as they are read (microscale/kernels/cpu_gemv.py), so reading fewer weight bytes pays; larger batches
(prefill) dequantise the weight to 16 bits for the matmul.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch
from decode_timing import decode_tokens_per_s

from microscale import LLM, CalibConfig
from microscale.models.loader import load_model_config
from microscale.quant.kv_cache import make_kv_cache

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-llama-pycode"
LLAMA_8B = REPO / "configs" / "models" / "Llama-3.1-8B"
TEXT = REPO / "data" / "pycode-valid.txt"
GIB = 1 << 30

# label -> LLM keyword arguments (dtype, quantization); calibration is added for static FP8.
WEIGHT_SCHEMES = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "fp8 (static, bf16 act.)": {"dtype": "bfloat16", "quantization": "fp8"},
    "fp8-dynamic (bf16 act.)": {"dtype": "bfloat16", "quantization": "fp8-dynamic"},
    "mxfp4 (W4A16, bf16)": {"dtype": "bfloat16", "quantization": "mxfp4"},
}
KV_SCHEMES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
              "fp8": (torch.bfloat16, "fp8"), "int4": (torch.bfloat16, "int4")}


def weight_gib(llm: LLM) -> float:
    return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters()) / GIB


def kv_tokens_per_gib(model_dir: Path) -> dict[str, float]:
    cfg = load_model_config(model_dir)
    out = {}
    for label, (dtype, scheme) in KV_SCHEMES.items():
        cache = make_kv_cache(scheme, cfg.num_key_value_heads, cfg.head_dim, dtype, torch.device("cpu"))
        out[label] = GIB / (cache.bytes_per_token() * cfg.num_hidden_layers)
    return out


def run(model_dir: Path, dummy: bool, batch: int, tokens: int, calib: CalibConfig) -> dict:
    rows = {}
    for label, kwargs in WEIGHT_SCHEMES.items():
        extra = {"load_format": "dummy", "tokenizer": str(TINY)} if dummy else {}
        if kwargs.get("quantization") == "fp8" and not dummy:
            extra["calib_config"] = calib  # dummy weights come with dummy input scales (1.0)
        if dummy and kwargs["dtype"] == "float32":
            rows[label] = {"weights_gib": None}  # 32 GB does not fit this machine: computed below
            continue
        llm = LLM(str(model_dir), max_model_len=256, max_num_seqs=batch, kv_cache_memory=0.25, **kwargs, **extra)
        rows[label] = {"weights_gib": weight_gib(llm), "decode_tok_s": decode_tokens_per_s(
            llm, [list(range(100 + i, 132 + i)) for i in range(batch)], tokens)}
        del llm
        gc.collect()
    if rows["fp32"]["weights_gib"] is None:
        rows["fp32"]["weights_gib"] = 2 * rows["bf16"]["weights_gib"]
        rows["fp32"]["note"] = "computed (2x bf16): does not fit in this machine's memory"
    return {"weights": rows, "kv_tokens_per_gib": kv_tokens_per_gib(model_dir)}


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}")
    print("| weights | resident GiB | vs bf16 | decode tok/s | vs bf16 |\n|---|---|---|---|---|")
    bf16 = result["weights"]["bf16"]
    for label, row in result["weights"].items():
        speed = row.get("decode_tok_s")
        ratio = f"{speed / bf16['decode_tok_s']:.2f}x" if speed else "-"
        speed_text = f"{speed:.1f}" if speed else "-"
        print(f"| {label} | {row['weights_gib']:.3f} | {row['weights_gib'] / bf16['weights_gib']:.3f}x | "
              f"{speed_text} | {ratio} |")
    kv = result["kv_tokens_per_gib"]
    print("| KV cache | tokens per GiB | vs bf16 |\n|---|---|---|")
    for label, tokens in kv.items():
        print(f"| {label} | {tokens:,.0f} | {tokens / kv['bf16']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--tokens-8b", type=int, default=8, help="tokens per sequence for the 8B shape (batch 1)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calib.txt"
        calib_file.write_text(TEXT.read_text()[-100_000:])
        calib = CalibConfig(calib_dataset=str(calib_file), calib_batches=16, calib_max_seq_length=256)
        results = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                   "tiny-llama-pycode": run(TINY, False, args.batch, args.tokens, calib)}
        print_table("tiny-llama-pycode (trained weights)", results["tiny-llama-pycode"])
        if not args.skip_8b:
            results["Llama-3.1-8B"] = run(LLAMA_8B, True, 1, args.tokens_8b, calib)
            print_table("Llama-3.1-8B shape (dummy weights, batch 1)", results["Llama-3.1-8B"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
