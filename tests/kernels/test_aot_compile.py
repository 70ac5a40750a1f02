"""Every Triton kernel compiles for real GPU targets (sm_80 / sm_89 / sm_90), with no GPU: the interpreter the
other kernel tests use accepts code the real compiler rejects. A representative subset of the sweep runs here
(`python -m microscale.kernels.aot.sweep` runs all of it); it leans on Triton internals, pinned in the dev extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sweep(tmp_path, runs: dict[str, tuple[str, ...]]) -> tuple[dict[str, int], str, list[dict]]:
    """Run the sweep once per entry (in parallel: compiling is single-threaded), with TRITON_INTERPRET unset:
    kernel modules fix interpreter-dependent constexprs at import. Returns (exit status by run, their output,
    every result)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "microscale.kernels.aot.sweep", "--json",
                                str(tmp_path / f"{name}.json"), *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name, args in runs.items()
    }
    status, output, results = {}, "", []
    for name, proc in procs.items():
        output += f"--- {name}\n{proc.communicate()[0]}"
        status[name] = proc.returncode
        path = tmp_path / f"{name}.json"
        results += json.loads(path.read_text()) if path.exists() else []
    return status, output, results


@pytest.fixture(scope="module")
def ci_sweep(tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("aot"), {
        "sm90": ("--subset", "ci", "--targets", "90"),
        "sm80-sm89": ("--subset", "ci-targets", "--targets", "80,89"),
    })


def test_ci_subset_compiles_or_is_refused_up_front(ci_sweep):
    status, output, results = ci_sweep
    assert set(status.values()) == {0}, output[-6000:]
    assert len(results) == 18 + 2 * 7, output[-6000:]
    failed = [f"sm_{r['arch']} {r['case']}: {r['detail']}" for r in results if r["status"] == "failed"]
    assert not failed, "\n".join(failed)
    compiled = [r for r in results if r["status"] == "compiled"]
    kernels = {k["kernel"] for r in compiled for k in r["kernels"]}
    # Every kernel family of the engine is in the subset: attention (decode split + reduce, prefill, KV writes),
    # norm, activation, MXFP4 GEMV, FP8 GEMM and both fused-MoE GEMMs.
    assert {"_split_kernel", "_reduce_kernel", "_prefill_attention_kernel", "_kv_cache_write_kernel",
            "_rms_norm_kernel", "_gated_kernel", "_decode_kernel", "_fp8_gemm_kernel", "_gate_up_kernel",
            "_down_kernel"} <= kernels
    for r in compiled:
        for k in r["kernels"]:
            assert k["registers"] > 0 and k["shared"] >= 0, k


def test_fused_moe_compiles_for_every_target(ci_sweep):
    """The MoE GEMMs once redefined an int32 as int64 inside an if-block: fine for the interpreter, a compile
    error for every GPU."""
    *_, results = ci_sweep
    moe = [r for r in results if "fused_moe" in r["case"]]
    assert {r["arch"] for r in moe} == {80, 89, 90}
    assert all(r["status"] == "compiled" for r in moe), [r["detail"] for r in moe]
    assert all({"_gate_up_kernel", "_down_kernel"} <= {k["kernel"] for k in r["kernels"]} for r in moe)


def test_int4_kv_cache_attention_compiles_for_every_target(ci_sweep):
    """The int4 KV cache (dynamic and static): its write, decode and prefill kernels on sm_80, sm_89 and sm_90."""
    *_, results = ci_sweep
    int4 = [r for r in results if "kv=int4" in r["case"]]
    assert {r["arch"] for r in int4} == {80, 89, 90}
    assert all(r["status"] == "compiled" for r in int4), [r["detail"] for r in int4]
    for r in int4:
        write_mode = "MODE=4" if "int4-static" in r["case"] else "MODE=5"  # kv_cache_write's int4 modes
        variant = {"_kv_cache_write_kernel": write_mode, "_split_kernel": "INT4=True",
                   "_prefill_attention_kernel": "INT4=True"}
        assert set(variant) <= {k["kernel"] for k in r["kernels"]}
        assert all(variant[k["kernel"]] in k["constexprs"] for k in r["kernels"] if k["kernel"] in variant)


def test_fp8_kernels_are_refused_below_sm89_with_a_reason(ci_sweep):
    *_, results = ci_sweep
    fp8 = [r for r in results if "kv=fp8" in r["case"] or "fp8-out" in r["case"] or "fp8_gemm" in r["case"]]
    assert fp8
    for r in fp8:
        if r["arch"] == 80:
            assert r["status"] == "refused" and "8.9" in r["detail"], r
        else:
            assert r["status"] == "compiled", r


def test_no_spills_in_hot_decode_kernels_on_sm90(ci_sweep):
    *_, results = ci_sweep
    hot = [(r["case"], k) for r in results if r["arch"] == 90 and "decode" in r["case"] for k in r["kernels"]]
    assert hot
    spilled = [f"{case}: {k['kernel']} {k['spills']} B" for case, k in hot if k["spills"]]
    assert not spilled, spilled
