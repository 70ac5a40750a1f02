"""Every Triton kernel, launched through the engine's own entry points with the shapes real models use, compiled
ahead of time for each GPU target (see harness.py). A case either compiles on a target or is refused up front by
the capability check the engine applies before choosing that kernel (the reason is recorded).

    python -m microscale.kernels.aot.sweep                  # the full sweep: every case, every target
    python -m microscale.kernels.aot.sweep --subset ci      # what `make test` runs
    python -m microscale.kernels.aot.sweep --json out.json  # kernel x case x target -> smem / registers / spills

Exit status 1 when a case fails to compile or a hot decode kernel spills on sm_90.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from microscale.kernels.aot.harness import CompiledKernel, Recorder, ptxas_supports
from microscale.kernels.selector import fp8_unavailable_reason

REPO = Path(__file__).resolve().parents[3]
MODELS = REPO / "configs" / "models"
TARGETS = (80, 89, 90, 100)
# Decode runs every step: a spill there costs every token. Spills in these fail the sweep on sm_90.
HOT_KERNELS = ("_split_kernel", "_reduce_kernel", "_decode_kernel", "_kv_cache_write_kernel", "_rms_norm_kernel",
               "_gated_kernel", "_gate_up_kernel", "_down_kernel", "_fp8_gemm_kernel")
_GPU = torch.device("cuda", 0)  # what capability checks are asked about; nothing is allocated on it
_BLOCK_SIZE = 16  # EngineArgs.block_size's default
_KV_KINDS = ("none", "int8", "int8-static", "int4", "int4-static", "fp8")


@dataclass(frozen=True)
class Case:
    name: str
    launch: Callable[[], None]
    # The engine's check before it picks this kernel on a device (None: Triton on any CUDA GPU).
    gate: Callable[[torch.device], str | None] | None = None


@dataclass
class Result:
    case: str
    arch: int
    status: str  # "compiled" | "refused" | "failed"
    detail: str = ""
    kernels: list[CompiledKernel] = field(default_factory=list)


@dataclass(frozen=True)
class Shapes:
    """What a model's layers hand the kernels."""

    name: str
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # distinct layer windows
    sinks: bool
    experts: int
    top_k: int
    eps: float

    @classmethod
    def load(cls, name: str) -> Shapes:
        from microscale.config import ModelConfig

        cfg = ModelConfig.from_file(MODELS / name / "config.json")
        return cls(name, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, tuple(dict.fromkeys(cfg.layer_windows)), cfg.attention_sinks, cfg.num_experts,
                   cfg.num_experts_per_tok, cfg.rms_norm_eps)


# ---- launches through the engine's entry points ---------------------------------------------------------------


def _kv_cache(shapes: Shapes, kind: str, dtype: torch.dtype, num_blocks: int):
    from microscale.quant.kv_cache import make_kv_cache

    cache = make_kv_cache(None if kind == "none" else kind.removesuffix("-static"), shapes.kv_heads,
                          shapes.head_dim, dtype, torch.device("cpu"))
    if kind.endswith("-static"):  # calibrated: per-head scales instead of per-token ones
        cache.set_scales(torch.ones(shapes.kv_heads), torch.ones(shapes.kv_heads))
    cache.allocate(num_blocks, _BLOCK_SIZE)
    return cache


def _attention(shapes: Shapes, dtype: torch.dtype, kind: str, decodes: int, context: int,
               prefills: Iterable[tuple[int, int]] = ()) -> Callable[[], None]:
    """One TritonAttentionBackend.forward per distinct layer window: `decodes` sequences at `context` tokens,
    then prefill chunks (query_len, context_start)."""

    def launch() -> None:
        from microscale.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
        from microscale.attention.triton_backend import TritonAttentionBackend

        chunks = list(prefills)
        longest = max([context] + [start + length for length, start in chunks])
        blocks_per_seq = -(-longest // _BLOCK_SIZE)
        # The kernels are compiled, never run: a small cache serves any block table (only strides matter).
        cache = _kv_cache(shapes, kind, dtype, num_blocks=64)
        tokens = decodes + sum(length for length, _ in chunks)
        q = torch.empty(tokens, shapes.heads, shapes.head_dim, dtype=dtype)
        k = torch.empty(tokens, shapes.kv_heads, shapes.head_dim, dtype=dtype)
        table = torch.zeros(blocks_per_seq, dtype=torch.int64)
        decode = None
        if decodes:
            decode = DecodeBatch(
                decodes, torch.full((decodes,), context - 1), context,
                block_tables=table.expand(decodes, -1), context_lens=torch.full((decodes,), context),
            )
        prefill_chunks, start = [], decodes
        for length, context_start in chunks:
            prefill_chunks.append(PrefillChunk(start, length, context_start, table))
            start += length
        slots = torch.zeros(tokens, dtype=torch.int64)
        sinks = torch.empty(shapes.heads, dtype=torch.float32) if shapes.sinks else None
        for window in shapes.windows:
            meta = AttentionMetadata(slots, slots, decode, prefill_chunks)
            TritonAttentionBackend().forward(q, k, k, cache, meta, shapes.head_dim**-0.5, window, 0, sinks)

    return launch


def _norm(shapes: Shapes, dtype: torch.dtype, tokens: int, fp8_out: bool, float32_weight: bool) -> Callable:
    def launch() -> None:
        from microscale.kernels.norm import rms_norm

        x = torch.empty(tokens, shapes.hidden, dtype=dtype)
        weight = torch.empty(shapes.hidden, dtype=torch.float32 if float32_weight else dtype)
        rms_norm(x, weight, shapes.eps, float32_weight, residual=torch.empty_like(x),
                 fp8_scale=torch.ones(()) if fp8_out else None)

    return launch


def _activation(shapes: Shapes, dtype: torch.dtype, tokens: int, clamped: bool, fp8_out: bool) -> Callable:
    def launch() -> None:
        from microscale.kernels.activation import clamped_swiglu, silu_and_mul

        x = torch.empty(tokens, 2 * shapes.inter, dtype=dtype)
        if clamped:
            clamped_swiglu(x, 7.0, 1.702)
        else:
            silu_and_mul(x, torch.ones(()) if fp8_out else None)

    return launch


def _projections(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """(N, K) of each Linear of a layer: fused q/k/v, o, fused gate/up and down (dense models)."""
    qkv = (shapes.heads + 2 * shapes.kv_heads) * shapes.head_dim
    out = {"qkv": (qkv, shapes.hidden), "o": (shapes.hidden, shapes.heads * shapes.head_dim)}
    if not shapes.experts:
        out |= {"gate_up": (2 * shapes.inter, shapes.hidden), "down": (shapes.hidden, shapes.inter)}
    return out


def _mxfp4_gemm(n: int, k: int, m: int, dtype: torch.dtype, bias: bool) -> Callable:
    def launch() -> None:
        from microscale.kernels.mxfp4_gemm import mxfp4_linear

        blocks = torch.empty(n, k // 32, 16, dtype=torch.uint8)
        scales = torch.empty(n, k // 32, dtype=torch.uint8)
        mxfp4_linear(torch.empty(m, k, dtype=dtype), blocks, scales, torch.empty(n, dtype=dtype) if bias else None)

    return launch


def _fp8_gemm(n: int, k: int, m: int, dtype: torch.dtype, per_token: bool) -> Callable:
    """Static FP8 (per-tensor scales) or dynamic (per-token activation, per-channel weight scales)."""

    def launch() -> None:
        from microscale.kernels.fp8_gemm import fp8_gemm

        fp8 = torch.float8_e4m3fn
        x_scale = torch.ones(m, 1) if per_token else torch.ones(())
        w_scale = torch.ones(n) if per_token else torch.ones(())
        fp8_gemm(torch.empty(m, k, dtype=fp8), x_scale, torch.empty(n, k, dtype=fp8), w_scale, None, dtype)

    return launch


def _fused_moe(shapes: Shapes, dtype: torch.dtype, tokens: int, mxfp4: bool) -> Callable:
    def launch() -> None:
        from microscale.kernels.fused_moe import fused_moe

        e, h, i = shapes.experts, shapes.hidden, shapes.inter
        if mxfp4:  # torch.empty reserves, never touches, the 1 GiB of gpt-oss-120b's expert bytes
            w13 = torch.empty(e, 2 * i, h // 32, 16, dtype=torch.uint8)
            w2 = torch.empty(e, h, i // 32, 16, dtype=torch.uint8)
            s13 = torch.empty(e, 2 * i, h // 32, dtype=torch.uint8)
            s2 = torch.empty(e, h, i // 32, dtype=torch.uint8)
        else:
            w13, w2 = torch.empty(e, 2 * i, h, dtype=dtype), torch.empty(e, h, i, dtype=dtype)
            s13 = s2 = None
        # Every expert gets tokens (the worst case for the grid): assignment j of token t goes to (t * k + j) % E.
        ids = (torch.arange(tokens * shapes.top_k) % e).view(tokens, shapes.top_k)
        weights = torch.empty(tokens, shapes.top_k, dtype=torch.float32)
        bias13, bias2 = torch.empty(e, 2 * i, dtype=dtype), torch.empty(e, h, dtype=dtype)
        activation = ("clamped_swiglu", 7.0, 1.702) if shapes.sinks else ("silu", 0.0, 0.0)
        fused_moe(torch.empty(tokens, h, dtype=dtype), weights, ids, w13, w2, bias13, bias2, activation, s13, s2)

    return launch


# ---- the cases ----------------------------------------------------------------------------------------------

_DENSE = ("Llama-3.1-8B", "Qwen3-8B", "Qwen3-0.6B")
_MOE = ("gpt-oss-20b", "gpt-oss-120b")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (decodes, context): batch 1 at long context (most splits), then batches up to the scheduler's 256.
_DECODES = ((1, 32768), (1, 4096), (8, 4096), (64, 4096), (256, 1024))
# Prefill steps: one 8192-token chunk; a 2048-token chunk of a longer prompt beside 64 decodes.
_PREFILLS = ((0, 0, ((8192, 0),)), (64, 2048, ((2048, 4096), (512, 0))))
_TOKENS = (1, 64, 8192)


def _fp8_gemm_gate(device: torch.device) -> str | None:
    from microscale.kernels.fp8_gemm import fp8_gemm_unavailable_reason

    return fp8_gemm_unavailable_reason(device)


def build_cases() -> list[Case]:
    cases: list[Case] = []
    for model in _DENSE + _MOE:
        shapes = Shapes.load(model)
        gpt_oss = model in _MOE
        for dtype_name in ("bf16", "fp16", "fp32") if model == "Llama-3.1-8B" else ("bf16",):
            dtype = _DTYPES[dtype_name]
            prefix = f"{model} {dtype_name}"
            for kind in _KV_KINDS:
                gate = fp8_unavailable_reason if kind == "fp8" else None
                for decodes, context in _DECODES:
                    cases.append(Case(f"{prefix} attention kv={kind} decode {decodes}x{context}",
                                      _attention(shapes, dtype, kind, decodes, context), gate))
                for decodes, context, chunks in _PREFILLS:
                    label = "+".join(f"{length}@{start}" for length, start in chunks)
                    cases.append(Case(f"{prefix} attention kv={kind} prefill {label} + {decodes} decodes",
                                      _attention(shapes, dtype, kind, decodes, context, chunks), gate))
            for tokens in _TOKENS:
                for fp8_out in (False, True):
                    suffix, gate = (" fp8-out", fp8_unavailable_reason) if fp8_out else ("", None)
                    cases.append(Case(f"{prefix} rms_norm T={tokens}{suffix}",
                                      _norm(shapes, dtype, tokens, fp8_out, gpt_oss), gate))
                    if not gpt_oss:
                        cases.append(Case(f"{prefix} silu_and_mul T={tokens}{suffix}",
                                          _activation(shapes, dtype, tokens, False, fp8_out), gate))
                if gpt_oss:
                    cases.append(Case(f"{prefix} clamped_swiglu T={tokens}", _activation(shapes, dtype, tokens, True,
                                                                                  False)))
                    for mxfp4 in (True, False):
                        cases.append(Case(f"{prefix} fused_moe {'mxfp4' if mxfp4 else '16-bit'} T={tokens}",
                                          _fused_moe(shapes, dtype, tokens, mxfp4)))
            for proj, (n, k) in _projections(shapes).items():
                for m in (1, 16, 64, 8192):
                    cases.append(Case(f"{prefix} mxfp4_linear {proj} M={m}", _mxfp4_gemm(n, k, m, dtype, gpt_oss)))
                    for per_token in (False, True):
                        cases.append(Case(f"{prefix} fp8_gemm {proj} M={m} {'dynamic' if per_token else 'static'}",
                                          _fp8_gemm(n, k, m, dtype, per_token), _fp8_gemm_gate))
    return cases


# What `make test` compiles (tests/kernels/test_aot_compile.py): on sm_90, every kernel family in the variants
# decode runs every step (the spill check) and in a prefill; on sm_80 and sm_89, the fused MoE, every FP8 kernel
# (refused on sm_80, compiled on sm_89) and the int4 KV cache's attention.
SUBSETS = {
    "ci": (
        "Llama-3.1-8B bf16 attention kv=none decode 1x32768",
        "Llama-3.1-8B bf16 attention kv=int8 decode 64x4096",
        "Llama-3.1-8B bf16 attention kv=int8-static decode 8x4096",
        "Llama-3.1-8B bf16 attention kv=fp8 decode 8x4096",
        "gpt-oss-20b bf16 attention kv=none prefill 2048@4096+512@0 + 64 decodes",
        "gpt-oss-20b bf16 attention kv=int4 prefill 2048@4096+512@0 + 64 decodes",
        "Llama-3.1-8B bf16 rms_norm T=1",
        "Llama-3.1-8B bf16 rms_norm T=1 fp8-out",
        "Llama-3.1-8B bf16 silu_and_mul T=1 fp8-out",
        "gpt-oss-20b bf16 rms_norm T=1",
        "gpt-oss-20b bf16 clamped_swiglu T=64",
        "gpt-oss-20b bf16 fused_moe mxfp4 T=1",
        "gpt-oss-20b bf16 fused_moe mxfp4 T=8192",
        "gpt-oss-20b bf16 fused_moe 16-bit T=1",
        "Llama-3.1-8B bf16 mxfp4_linear qkv M=1",
        "Llama-3.1-8B bf16 mxfp4_linear down M=8192",
        "Llama-3.1-8B bf16 fp8_gemm qkv M=1 dynamic",
        "Llama-3.1-8B bf16 fp8_gemm down M=8192 static",
    ),
    "ci-targets": (
        "gpt-oss-20b bf16 fused_moe mxfp4 T=1",
        "gpt-oss-20b bf16 fused_moe 16-bit T=1",
        "Llama-3.1-8B bf16 attention kv=fp8 decode 8x4096",
        "Llama-3.1-8B bf16 attention kv=int4-static prefill 2048@4096+512@0 + 64 decodes",
        "Llama-3.1-8B bf16 rms_norm T=1 fp8-out",
        "Llama-3.1-8B bf16 silu_and_mul T=1 fp8-out",
        "Llama-3.1-8B bf16 fp8_gemm qkv M=1 dynamic",
    ),
}


def select(cases: list[Case], subset: str | None = None, match: str | None = None) -> list[Case]:
    if subset is not None:
        names = SUBSETS[subset]
        by_name = {c.name: c for c in cases}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise KeyError(f"subset {subset!r} names cases that do not exist: {missing}")
        cases = [by_name[name] for name in names]
    return [c for c in cases if match is None or match in c.name]


# ---- running -------------------------------------------------------------------------------------------------


def run_case(case: Case, arch: int) -> Result:
    recorder = Recorder()
    try:
        # Inside, torch.cuda reports sm_`arch`: the gate is the engine's own capability check for this target.
        with recorder.target(arch):
            reason = case.gate(_GPU) if case.gate is not None else None
            if reason is None:
                case.launch()
    except Exception as error:  # noqa: BLE001 - one case's compile error is a result, not the end of the sweep
        return Result(case.name, arch, "failed", _first_line(error))
    if reason is not None:
        return Result(case.name, arch, "refused", reason)
    return Result(case.name, arch, "compiled", kernels=recorder.launches)


def _first_line(error: BaseException) -> str:
    lines = [line for line in "".join(traceback.format_exception_only(error)).splitlines() if line.strip()]
    return " | ".join(lines[-3:])[:400]


def hot_spills(results: Iterable[Result], arch: int = 90) -> list[str]:
    return [f"{r.case}: {k.kernel} spills {k.spills} B/thread ({k.constexprs})"
            for r in results if r.arch == arch for k in r.kernels if k.kernel in HOT_KERNELS and k.spills]


def run_sweep(cases: list[Case], targets: Iterable[int], log=print) -> list[Result]:
    results = []
    for arch in targets:
        if not ptxas_supports(arch):
            log(f"sm_{arch}: the ptxas bundled with Triton cannot assemble for it; skipped")
            continue
        started = time.perf_counter()
        for case in cases:
            result = run_case(case, arch)
            results.append(result)
            if result.status == "failed":
                log(f"FAILED sm_{arch} {case.name}: {result.detail}")
        log(f"sm_{arch}: {len(cases)} cases in {time.perf_counter() - started:.1f}s")
    return results


def summary_table(results: list[Result], targets: list[int]) -> list[str]:
    """Cases per target by status, then per kernel and target the worst registers / spill bytes / shared memory
    over every specialisation launched."""
    lines = ["| target | compiled | refused | failed |", "|---|---|---|---|"]
    for arch in targets:
        count = {status: sum(r.arch == arch and r.status == status for r in results)
                 for status in ("compiled", "refused", "failed")}
        lines.append(f"| sm_{arch} | {count['compiled']} | {count['refused']} | {count['failed']} |")
    worst: dict[tuple[str, int], tuple[int, int, int]] = {}
    for k in (k for r in results for k in r.kernels):
        regs, spills, shared = worst.get((k.kernel, k.arch), (0, 0, 0))
        worst[(k.kernel, k.arch)] = (max(regs, k.registers), max(spills, k.spills), max(shared, k.shared))
    lines += ["", "| kernel | " + " | ".join(f"sm_{a} regs / spill B / smem" for a in targets) + " |",
              "|---|" + "---|" * len(targets)]
    for kernel in sorted({kernel for kernel, _ in worst}):
        cells = [f"{w[0]} / {w[1]} / {w[2] // 1024}K" if (w := worst.get((kernel, a))) else "–" for a in targets]
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    return lines


def kernel_table(results: Iterable[Result]) -> list[str]:
    """One line per compiled specialisation (kernel, target, constexprs, warps, stages: its resources are fixed),
    with the first case that launched it."""
    first: dict[tuple, tuple[CompiledKernel, str]] = {}
    for r in results:
        for k in r.kernels:
            first.setdefault((k.kernel, k.arch, k.constexprs, k.num_warps, k.num_stages), (k, r.case))
    lines = ["| kernel | sm | warps | smem B | regs | spills B | first case | constexprs |",
             "|---|---|---|---|---|---|---|---|"]
    for _, (k, case) in sorted(first.items()):
        lines.append(f"| {k.kernel} | {k.arch} | {k.num_warps} | {k.shared} | {k.registers} | {k.spills} | {case} "
                     f"| {k.constexprs} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=sorted(SUBSETS), help="only the cases of this subset")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--match", help="only cases whose name contains this")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--table", action="store_true", help="print the kernel x target resource table")
    args = parser.parse_args(argv)
    cases = select(build_cases(), args.subset, args.match)
    targets = [int(t) for t in args.targets.split(",")]
    results = run_sweep(cases, targets)
    spills = hot_spills(results)
    failed = [r for r in results if r.status == "failed"]
    refused = [r for r in results if r.status == "refused"]
    compiled = [r for r in results if r.status == "compiled"]
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    if args.table:
        print("\n".join(summary_table(results, targets) + ["", "## Every specialisation", ""]
                        + kernel_table(results)))
    for line in spills:
        print(f"SPILL on sm_90 in a hot kernel: {line}")
    print(f"{len(compiled)} compiled, {len(refused)} refused by a capability check, {len(failed)} failed; "
          f"{sum(len(r.kernels) for r in compiled)} launches; {len(spills)} hot-kernel spills on sm_90")
    return 1 if failed or spills else 0


if __name__ == "__main__":
    sys.exit(main())
