"""The CPU products (kernels/cpu/gemv.c, built with the machine's compiler) against float64 sums of the exact
weight values: every FP8 byte (subnormals, signed zeros), MXFP4 codes under extreme and NaN scales, float32,
bfloat16 and float16 weights with a bias rounded once, row counts across the kernel's groups of four; a row's
bits do not depend on the row count or the threads; the FP8 and MXFP4 Linear methods and dense_linear use them
on a CPU for decode-sized inputs only; and a machine that cannot build them says why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microscale.kernels import cpu_gemv, cpu_linear
from microscale.kernels.batch_invariant import batch_invariant_mode
from microscale.kernels.cpu_gemv import (
    cpu_gemv_unavailable_reason,
    dense_gemv,
    dense_gemv_unavailable_reason,
    fp8_gemv,
    mxfp4_gemv,
)
from microscale.kernels.cpu_linear import dense_linear
from microscale.layers.activation import SiluAndMul
from microscale.layers.linear import Linear
from microscale.layers.moe import FusedMoE
from microscale.quant import fp8, mxfp4_linear
from microscale.quant.base import ExpertsQuantMethod
from microscale.quant.mxfp4 import pack_mxfp4, unpack_mxfp4
from microscale.quant.mxfp4_experts import Mxfp4ExpertsMethod
from microscale.quant.mxfp4_linear import Mxfp4LinearMethod

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu_gemv_unavailable_reason(CPU, 32) is not None,
                                reason=f"{cpu_gemv_unavailable_reason(CPU, 32)}")


def _every_fp8_byte(n: int, k: int) -> torch.Tensor:
    """[n, k] float8_e4m3fn holding each byte but E4M3's two NaNs, in a shuffled order."""
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    picks = torch.randint(len(codes), (n, k), generator=torch.Generator().manual_seed(0))
    picks.view(-1)[: len(codes)] = torch.arange(len(codes))
    return codes[picks].view(torch.float8_e4m3fn)


def _assert_close(y: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    # float32 sums of K exact products: off by a few float32 roundings of the sum of |products|
    bound = (x.double().abs() @ w.double().abs().T) * 64 * 2**-24
    assert ((y.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("m", [1, 3, 4, 6, 8])
def test_fp8_products_equal_exact_sums(m: int) -> None:
    w = _every_fp8_byte(43, 256)  # a last task of 11 rows: blocks of 4 (or 2), then one by one
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    expected = x.double() @ w.double().T
    _assert_close(fp8_gemv(x, w), expected, x, w)


@pytest.mark.parametrize("m", [1, 3, 5])
def test_mxfp4_products_equal_exact_sums(m: int) -> None:
    blocks, scales = pack_mxfp4(torch.randn(27, 128, generator=torch.Generator().manual_seed(1)) * 5)
    blocks[0] = torch.arange(256, dtype=torch.uint8)[:64].view(4, 16)  # every code in both nibbles
    scales[1, :] = torch.tensor([0, 1, 127, 160], dtype=torch.uint8)  # 2^-127 (a float32 subnormal) .. 2^33
    scales[2, 3] = 0xFF  # the spec's NaN scale: a NaN row
    w = unpack_mxfp4(blocks, scales, torch.float32)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    y = mxfp4_gemv(x, blocks, scales)
    expected = x.double() @ w.double().T
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, [0, 1, *range(3, 27)]]).any()
    finite = [0, 1, *range(3, 27)]
    _assert_close(y[:, finite], expected[:, finite], x, w[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_dense_products_equal_exact_sums_rounded_once(dtype: torch.dtype, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(43, 96, generator=gen).to(dtype)  # 43 rows: blocks of 4 (or 2), then one by one
    x, bias = torch.randn(m, 96, generator=gen).to(dtype), torch.randn(43, generator=gen).to(dtype)
    y = dense_gemv(x, w, bias)
    exact = x.double() @ w.double().T
    assert y.dtype == dtype and y.shape == (m, 43)
    # 16-bit outputs: the float32 sum plus the bias, rounded to the dtype once (off by at most half a unit of
    # the dtype beyond the float32 sum's own error)
    unit = 2.0 ** -(8 if dtype == torch.bfloat16 else 11 if dtype == torch.float16 else 24)
    total = exact + bias.double()
    bound = (x.double().abs() @ w.double().abs().T) * 64 * 2**-24 + total.abs() * unit
    assert ((y.double() - total).abs() <= bound).all()


def test_a_rows_result_does_not_depend_on_the_row_count_or_threads() -> None:
    w = _every_fp8_byte(48, 128)
    blocks, scales = pack_mxfp4(torch.randn(48, 128, generator=torch.Generator().manual_seed(2)))
    dense = torch.randn(48, 128, generator=torch.Generator().manual_seed(4)).bfloat16()
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(3))

    def products(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fp8_gemv(rows, w), mxfp4_gemv(rows, blocks, scales), dense_gemv(rows.bfloat16(), dense)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [products(x[i : i + 1]) for i in range(7)]
        torch.set_num_threads(2)
        together = products(x)
    finally:
        torch.set_num_threads(threads)
    for kind, batch in enumerate(together):
        assert torch.equal(torch.cat([rows[kind] for rows in alone]), batch)


def test_bad_operands_are_refused() -> None:
    w = _every_fp8_byte(8, 64)
    with pytest.raises(ValueError, match="float32"):
        fp8_gemv(torch.randn(1, 64, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="multiple of 32"):
        fp8_gemv(torch.randn(1, 48), _every_fp8_byte(8, 48))
    blocks, scales = pack_mxfp4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="do not match"):
        mxfp4_gemv(torch.randn(1, 32), blocks, scales)
    dense = torch.randn(8, 64)
    row = torch.randn(1, 64)
    for x, w, bias in ((row.bfloat16(), dense, None), (torch.randn(1, 40), torch.randn(8, 40), None),
                       (row, dense.t().contiguous().t(), None), (row, dense, torch.randn(7)), (row[0], dense, None)):
        with pytest.raises(ValueError, match="dense_gemv takes"):
            dense_gemv(x, w, bias)


def test_unavailable_reasons(monkeypatch, tmp_path) -> None:
    assert cpu_gemv_unavailable_reason(torch.device("cuda"), 64) == "a CPU kernel, not for cuda"
    assert cpu_gemv_unavailable_reason(CPU, 40) == "needs K a multiple of 32 (K=40)"
    assert dense_gemv_unavailable_reason(torch.device("cuda"), torch.float32, 64) == "a CPU kernel, not for cuda"
    assert dense_gemv_unavailable_reason(CPU, torch.float64, 64) == (
        "takes float32, bfloat16 or float16 weights, not torch.float64")
    assert dense_gemv_unavailable_reason(CPU, torch.bfloat16, 40) == "needs K a multiple of 16 (K=40)"
    cpu_gemv._load.cache_clear()
    try:
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert cpu_gemv_unavailable_reason(CPU, 64) == "no C compiler (cc, or $CC) to build it with"
        cpu_gemv._load.cache_clear()
        broken = tmp_path / "cc"
        broken.write_text("#!/bin/sh\necho 'cc 1.0'\necho 'error: cannot compile' >&2\n[ \"$1\" = --version ]\n")
        broken.chmod(0o755)
        monkeypatch.setenv("CC", str(broken))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert cpu_gemv_unavailable_reason(CPU, 64).endswith("failed: error: cannot compile")
        assert not list((tmp_path / "cache").rglob("*.partial"))  # nothing half-built left behind
    finally:
        monkeypatch.undo()
        cpu_gemv._load.cache_clear()
    assert cpu_gemv_unavailable_reason(CPU, 64) is None


def test_the_fp8_linear_uses_it_for_decode_sized_inputs_only(monkeypatch) -> None:
    w_q = _every_fp8_byte(80, 64)
    x_q = (torch.randn(12, 64, generator=torch.Generator().manual_seed(4)) * 50).to(torch.float8_e4m3fn)
    x_scale, w_scale = torch.rand(12, 1) + 0.5, torch.rand(80) + 0.5
    bias = torch.randn(80).bfloat16()
    calls = []
    monkeypatch.setattr(fp8, "fp8_gemv", lambda x, w: calls.append(len(x)) or fp8_gemv(x, w))
    for m in (1, 8, 12):
        out = fp8.cpu_fp8_matmul(x_q[:m], x_scale[:m], w_q, w_scale, bias, torch.bfloat16)
        reference = fp8.fp8_matmul_reference(x_q[:m], x_scale[:m], w_q, w_scale, bias, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, reference, rtol=2**-7, atol=2**-7 * reference.abs().max().item())
    assert calls == [1, 8]  # 12 rows: the reference
    with batch_invariant_mode():
        fp8.cpu_fp8_matmul(x_q[:1], x_scale[:1], w_q, w_scale, None, torch.float32)
    assert calls == [1, 8]


def test_dense_linear_uses_it_for_decode_sized_cpu_inputs_only(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(9)
    w, bias = torch.randn(24, 32, generator=gen).bfloat16(), torch.randn(24, generator=gen).bfloat16()
    calls = []
    monkeypatch.setattr(cpu_linear, "dense_gemv", lambda x, w, b: calls.append(len(x)) or dense_gemv(x, w, b))
    for shape in ((1, 32), (2, 4, 32), (12, 32)):  # 8 rows in a 3-D input; 12 rows: BLAS
        x = torch.randn(*shape, generator=gen).bfloat16()
        out = dense_linear(x, w, bias)
        assert out.shape == (*shape[:-1], 24)
        torch.testing.assert_close(out, F.linear(x, w, bias), rtol=2**-7, atol=2**-6)
    assert calls == [1, 8]
    with batch_invariant_mode():  # deterministic mode: a row's bits must not depend on the step's row count
        dense_linear(torch.randn(1, 32).bfloat16(), w)
    dense_linear(torch.randn(1, 40), torch.randn(24, 40))  # K not a multiple of 16
    dense_linear(torch.randn(1, 32).bfloat16(), w.t().contiguous().t())  # a strided weight
    assert calls == [1, 8]
    assert dense_linear(torch.randn(1, 32, device="meta"), w.to("meta")).shape == (1, 24)  # not a CPU
    # Inside a compiled graph it is one opaque op that picks its path when it runs (the row count is dynamic).
    # (As the compiled forward compiles it: static weights, a dynamic row count.)
    compiled = torch.compile(lambda x: dense_linear(x, w, bias), fullgraph=True, dynamic=False, backend="eager")
    with torch._dynamo.config.patch(disable=False):  # tests/conftest.py turns compiling off
        for rows in (3, 11):
            x = torch.randn(rows, 32, generator=gen).bfloat16()
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), F.linear(x, w, bias), rtol=2**-7, atol=2**-6)
    assert calls == [1, 8, 3]


def test_the_mxfp4_linear_picks_it_on_a_cpu() -> None:
    layer = Linear(64, [40], bias=True, quant_method=Mxfp4LinearMethod())
    layer.load_weight("weight", torch.randn(40, 64, generator=torch.Generator().manual_seed(6)), None)
    layer.load_weight("bias", torch.randn(40, generator=torch.Generator().manual_seed(7)), None)
    layer.quant_method.select_kernel(layer, "torch", CPU)  # what the runner does at load
    assert layer.mxfp4_matmul.__name__ == "_cpu_matmul"
    weight = unpack_mxfp4(layer.weight_blocks, layer.weight_scales, torch.float32)
    for m in (3, 9):  # nine rows: the reference
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_mxfp4_experts_multiply_their_packed_weights_for_few_tokens(monkeypatch) -> None:
    layer = FusedMoE(4, 2, 64, 32, True, torch.float32, SiluAndMul(), Mxfp4ExpertsMethod())
    gen = torch.Generator().manual_seed(8)
    for name, shape in (("w13", (4, 64, 64)), ("w2", (4, 64, 32))):
        layer.quant_method.load_weight(layer, name, torch.randn(shape, generator=gen))
    layer.w13_bias.data.normal_(generator=gen)
    x, bias = torch.randn(3, 64, generator=gen), layer.w13_bias[1]
    hidden = torch.randn(3, 32, generator=gen)
    calls = []
    monkeypatch.setattr(mxfp4_linear, "mxfp4_gemv", lambda x, b, s: calls.append(len(x)) or mxfp4_gemv(x, b, s))
    packed = layer.quant_method.expert_linears(layer, 1, torch.float32, tokens=3)
    decoded = ExpertsQuantMethod.expert_linears(layer.quant_method, layer, 1, torch.float32, tokens=3)
    torch.testing.assert_close(packed[0](x, bias), decoded[0](x, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1](hidden, None), decoded[1](hidden, None), rtol=1e-5, atol=1e-5)
    assert calls == [3, 3]  # the packed weights, not a decoded copy
    many = layer.quant_method.expert_linears(layer, 1, torch.float32, tokens=9)
    many[0](torch.randn(9, 64, generator=gen), None)
    assert calls == [3, 3]  # nine tokens: the decoded expert
