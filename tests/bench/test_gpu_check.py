"""benchmarks/gpu_check.py on this CPU: its dry run (kernels through Triton's interpreter, tiny models, the table's
plumbing), the refusal to run without a GPU otherwise, and the pass/fail logic of its checks (a kernel compared
with a wrong reference fails; a failing or crashing check never stops the others)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402

from microscale.kernels import activation  # noqa: E402

META_KEYS = {"device", "torch", "triton", "cuda", "python", "git_commit", "date", "dry_run", "quick", "interpreter",
             "command", "seconds"}
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def _run(tmp_path: Path, capsys, *argv: str) -> tuple[int, dict, str]:
    out = tmp_path / "gpu-check.json"
    code = gpu_check.main(["--dry-run", "--out", str(out), *argv])
    return code, json.loads(out.read_text()), capsys.readouterr().out


@pytest.mark.slow
@needs_cpu_only
def test_dry_run_checks_every_kernel_and_model(tmp_path, capsys):
    """The dry run as `python benchmarks/gpu_check.py --dry-run` runs it, in two parts: every kernel and the
    performance table, then the end-to-end section for the tiny Llama (tests/kernels/test_triton_end_to_end.py runs
    Qwen3 and gpt-oss through the Triton kernels already; here it is the section's plumbing that is checked)."""
    code, result, table = _run(tmp_path, capsys, "--skip-e2e")
    assert code == 0, [r for r in result["rows"] if r["status"] not in ("pass", "ok")]
    meta, rows = result["meta"], result["rows"]
    assert META_KEYS <= meta.keys() and meta["dry_run"] and meta["interpreter"] and "no GPU" in meta["device"]
    by = {s: [r for r in rows if r["section"] == s] for s in ("kernels", "e2e", "perf", "gemm")}
    kernels = by["kernels"]
    for kind in ("decode attention", "prefill attention", "KV cache write", "RMSNorm", "RMSNorm -> FP8",
                 "clamped SwiGLU", "SwiGLU -> FP8", "MXFP4 GEMM", "FP8 GEMM", "fused MoE MXFP4", "fused MoE bf16"):
        assert any(kind in r["name"] for r in kernels), kind
    for kv in gpu_check.KV_KINDS:
        assert sum(r["name"].endswith(f"KV {kv}") for r in kernels) == 5  # decode, prefill (2 shapes each), write
    assert all(r["status"] == "pass" and isinstance(r["max_err"], float) and r["tol"] for r in kernels)
    assert not by["e2e"]
    assert all(r["status"] == "ok" for r in by["perf"] + by["gemm"])
    perf = {r["name"]: r for r in by["perf"]}
    assert perf["HBM bandwidth (device-to-device copy)"]["gbps"] > 0
    decode = [r for r in by["perf"] if " decode, batch " in r["name"]]
    assert len(decode) == 5 * len(gpu_check.TINY.batches)  # Llama in 4 schemes, gpt-oss
    assert all(r["unit"] == "tok/s" and "roofline_pct" in r for r in decode)
    assert any("offline" in name for name in perf)
    assert all({"bf16_ms", "mxfp4_ms", "fp8_triton_ms", "fp8_scaled_mm_note"} <= r.keys() for r in by["gemm"])
    # The table comes last, and says the timings mean nothing here.
    assert "meaningless" in table and table.rstrip().splitlines()[-1].startswith("| down ")
    for heading in ("### Kernels", "### Bandwidth", "### GEMMs"):
        assert heading in table

    code, result, table = _run(tmp_path, capsys, "--skip-kernels", "--skip-perf", "--only", "llama float32")
    (row,) = result["rows"]
    assert code == 0 and row["section"] == "e2e" and row["name"].startswith("llama float32 triton eager")
    assert row["status"] == "pass" and "tokens equal" in row["detail"]
    assert "### End to end" in table


@needs_cpu_only
def test_without_a_gpu_it_refuses_unless_dry_run(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_a_wrong_kernel_fails_its_checks_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    """SwiGLU replaced by one that reads its rows in reverse order: both SwiGLU checks fail, while the clamped SwiGLU
    and the fused MoE checks (the same filter, other kernels) still run and pass; the exit status says so."""
    original = activation.silu_and_mul
    monkeypatch.setattr(activation, "silu_and_mul", lambda x, fp8_scale=None: original(x.flip(0), fp8_scale))
    code, result, _ = _run(tmp_path, capsys, "--skip-e2e", "--skip-perf", "--only", "SwiGLU")
    status = {r["name"].split(" 13x")[0]: r["status"] for r in result["rows"]}
    moe = [name for name in status if name.startswith("fused MoE")]
    assert {status.pop(name) for name in moe} == {"pass"} and len(moe) == 3
    assert status == {"SwiGLU": "fail", "clamped SwiGLU": "pass", "SwiGLU -> FP8": "fail"}
    assert code == 1


def test_runner_records_failures_errors_and_skips():
    runner = gpu_check.Runner()
    x = torch.linspace(-2, 2, 64)
    runner.run("kernels", "right reference", lambda: gpu_check.within(x + 1e-4, x, 1e-3, "1e-3"))
    runner.run("kernels", "wrong reference", lambda: gpu_check.within(x, x * 1.01, 1e-3, "1e-3"))
    runner.run("kernels", "NaN output", lambda: gpu_check.within(x.clone().fill_(float("nan")), x, 1.0, "1"))
    runner.run("kernels", "crashes", lambda: 1 / 0)

    def skipped():
        raise gpu_check.Skip("needs sm_89")

    runner.run("kernels", "skipped", skipped)
    runner.run("kernels", "last", lambda: gpu_check.also(gpu_check.exact(x, x), gpu_check.exact(x, -x)))
    assert [r["status"] for r in runner.rows] == ["pass", "fail", "fail", "error", "skip", "fail"]
    assert runner.rows[1]["max_err"] == pytest.approx(0.02, rel=1e-3)
    assert "ZeroDivisionError" in runner.rows[3]["detail"] and runner.rows[4]["detail"] == "needs sm_89"
    assert "bit-exact failed" in runner.rows[5]["detail"]
    only = gpu_check.Runner(only="moe")
    assert only.run("kernels", "decode attention", lambda: 1 / 0) is None and not only.rows


def test_ulps_and_exactness():
    ref = torch.tensor([1.0, 2.0, 1e-3, 0.0], dtype=torch.bfloat16)
    one_ulp_up = torch.tensor([1.0078125, 2.0, 1e-3, 0.0], dtype=torch.bfloat16)  # bfloat16's spacing at 1: 2^-7
    assert gpu_check.within_ulps(one_ulp_up, ref, 1).passed
    assert not gpu_check.within_ulps(one_ulp_up, ref, 1, max_off=0.2).passed  # 1 of 4 values off
    assert not gpu_check.within_ulps(ref * 1.05, ref, 1).passed
    assert gpu_check.exact(ref, ref.clone()).max_err == 0 and gpu_check.exact(one_ulp_up, ref).max_err == 1


def test_roofline_arithmetic():
    assert gpu_check.expected_experts(32, 4, 1) == pytest.approx(4)
    assert gpu_check.expected_experts(32, 4, 8) == pytest.approx(32 * (1 - (7 / 8) ** 8))
    assert gpu_check.expected_experts(32, 4, 1000) == pytest.approx(32)
    assert gpu_check.roofline(0.5, 2e9, 8.0) == {"gbps": 4.0, "roofline_pct": 50.0}
    assert gpu_check.roofline(1.0, 1e9, None)["roofline_pct"] is None


def test_json_and_table_of_odd_rows():
    rows = [{"section": "kernels", "name": "k", "status": "fail", "max_err": float("nan"), "tol": "1", "detail": ""},
            {"section": "gemm", "name": "GEMM o", "status": "ok", "proj": "o", "M": 1, "N": 8, "K": 32,
             "bf16_ms": 2.0, "mxfp4_ms": 0.5, "mxfp4_roofline_pct": 80.0, "fp8_triton_ms": None,
             "fp8_triton_note": "FP8 tl.dot needs compute capability 8.9+", "fp8_scaled_mm_ms": None},
            {"section": "gemm", "name": "GEMM down", "status": "error", "detail": "OutOfMemoryError: ..."}]
    meta = {"device": "H200", "date": "2026-12-02T00:00:00+00:00", "git_commit": "abc", "torch": "2.11",
            "triton": "3.6", "cuda": "13.0", "command": "python benchmarks/gpu_check.py", "seconds": 1.0,
            "dry_run": False, "interpreter": False}
    result = {"meta": meta, "summary": gpu_check.summarize(rows), "rows": rows}
    assert json.loads(json.dumps(gpu_check.json_safe(result), allow_nan=False))["rows"][0]["max_err"] == "nan"
    table = gpu_check.markdown(result)
    assert "meaningless" not in table and "1 error, 1 fail, 1 ok" in table
    assert "| o 8×32 | 1 | 2 | 0.5 (4.00×), 80% | n/a (FP8 tl.dot needs compute capability 8.9+) |" in table
    assert table.splitlines()[-1].startswith("| GEMM down |")
