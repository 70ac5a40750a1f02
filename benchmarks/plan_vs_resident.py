"""The memory planner against reality at full size: for each model shape of configs/models and weight format, the
planner's weight bytes (config.json alone) beside the resident bytes (parameters + buffers) of the model loaded
with dummy weights on this CPU, one at a time; writes benchmarks/results/plan.md.

    .venv/bin/python benchmarks/plan_vs_resident.py --runs Llama-3.1-8B:fp8 Qwen3-8B:mxfp4 gpt-oss-20b:none

bfloat16 activations; a run needs its weights' bytes of free host memory (an 8B model in bf16: ~16 GB).
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from microscale.config import EngineArgs
from microscale.engine.plan import DeviceMemory, plan_memory, resident_bytes
from microscale.models.loader import load_model, load_model_config
from microscale.quant.scheme import QuantScheme

ROOT = Path(__file__).parents[1]
GIB = 1 << 30


def one_run(name: str, quant: str | None, max_model_len: int) -> dict:
    folder = ROOT / "configs" / "models" / name
    cfg = load_model_config(folder)
    args = EngineArgs(model=str(folder), quantization=quant, load_format="dummy", max_model_len=max_model_len,
                      dtype="bfloat16", device="cpu")
    started = time.perf_counter()
    plan = plan_memory(args, cfg, max_model_len, torch.bfloat16, DeviceMemory.of(torch.device("cpu")), name)
    plan_s = time.perf_counter() - started
    started = time.perf_counter()
    model, _ = load_model(folder, cfg, torch.bfloat16, torch.device("cpu"), max_model_len,
                          QuantScheme.resolve(quant, cfg.hf_config.get("quantization_config")), "dummy")
    load_s = time.perf_counter() - started
    resident = resident_bytes(model)
    del model
    gc.collect()
    return {"model": name, "quant": f"{plan.quant_linear} / experts {plan.quant_experts}",
            "predicted": plan.weight_bytes, "resident": resident, "plan_s": plan_s, "load_s": load_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="MODEL:QUANT")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan.md"))
    args = p.parse_args()
    rows = []
    for run in args.runs:
        name, _, quant = run.partition(":")
        row = one_run(name, None if quant in ("", "none") else quant, args.max_model_len)
        rows.append(row)
        print(row, flush=True)
    lines = ["| model | weights (linear / experts) | predicted bytes | resident bytes | error | plan s | load s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        error = (r["predicted"] - r["resident"]) / r["resident"]
        lines.append(f"| {r['model']} | {r['quant']} | {r['predicted']:,} ({r['predicted'] / GIB:.2f} GiB) | "
                     f"{r['resident']:,} | {error:+.4%} | {r['plan_s']:.2f} | {r['load_s']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
