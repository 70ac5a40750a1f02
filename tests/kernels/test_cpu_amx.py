"""The AMX bfloat16 product (kernels/cpu/amx_matmul.c) against float64 sums: row counts across its 16-row tiles
and pairs of them, weight rows across its pairs of 16-row blocks, with and without a bias, NaN and infinity
carried through; a row's bits do not depend on the row count or the threads; dense_linear takes it for bfloat16
weights at every row count, deterministic mode included, in eager and compiled code; and a CPU without AMX says
why."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microscale.kernels import cpu_amx, cpu_linear
from microscale.kernels.batch_invariant import batch_invariant_mode
from microscale.kernels.cpu_amx import amx_linear, amx_unavailable_reason
from microscale.kernels.cpu_linear import dense_linear

CPU = torch.device("cpu")
REASON = amx_unavailable_reason(CPU, torch.bfloat16, 16, 32)
needs_amx = pytest.mark.skipif(REASON is not None, reason=f"{REASON}")


def _operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16(),
            torch.randn(n, generator=gen).bfloat16())


def _assert_rounded_sum(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y is the float64 sum rounded to bfloat16, give or take float32 summation error (K terms): half a
    bfloat16 step plus K * 2^-24 of the sum of |products|."""
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    bound = exact.abs() * 2**-8 + magnitude * x.shape[1] * 2**-24 + 1e-30
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= bound).all(), (y.double() - exact).abs().div(bound).max()


@needs_amx
@pytest.mark.parametrize("m", [1, 15, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("n, k", [(16, 32), (48, 96), (64, 576)])
def test_it_is_the_rounded_sum_for_every_tile_tail(m: int, n: int, k: int) -> None:
    x, w, bias = _operands(m, n, k)
    _assert_rounded_sum(amx_linear(x, w, bias), x, w, bias)
    _assert_rounded_sum(amx_linear(x, w), x, w, None)


@needs_amx
def test_a_rows_bits_do_not_depend_on_its_batch_or_the_threads() -> None:
    x, w, bias = _operands(37, 1040, 256, seed=1)  # 1040 x 256 x 2 bytes: past the serial threshold
    full = amx_linear(x, w, bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = amx_linear(x, w, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(full, single_thread)
    for rows in (slice(0, 1), slice(5, 6), slice(16, 33), slice(36, 37)):
        assert torch.equal(amx_linear(x[rows], w, bias), full[rows])


@needs_amx
def test_nan_and_infinity_are_carried_through() -> None:
    x, w, _ = _operands(3, 32, 64, seed=2)
    x[0, 5], x[1, 7], w[4, 7] = float("nan"), float("inf"), 0.0
    y = amx_linear(x, w)
    assert y[0].isnan().all()
    assert y[1].isinf().sum() + y[1].isnan().sum() == 32  # +-inf, or NaN where inf met a zero weight
    assert y[1, 4].isnan()
    assert y[2].isfinite().all()


@needs_amx
def test_bad_operands_are_refused() -> None:
    x, w, bias = _operands(2, 32, 64)
    for args in ((x.float(), w, bias), (x, w[:24], None), (x[:, :48], w[:, :48], bias), (x, w, bias[:16]),
                 (x, w.t().contiguous().t(), None), (x[:, :32], w, bias)):
        with pytest.raises(ValueError, match="amx_linear takes"):
            amx_linear(*args)
    assert amx_linear(x[:0], w, bias).shape == (0, 32)


def test_unavailable_reasons() -> None:
    assert amx_unavailable_reason(torch.device("cuda"), torch.bfloat16, 16, 32) == "a CPU kernel, not for cuda"
    assert amx_unavailable_reason(CPU, torch.float32, 16, 32) == "takes bfloat16 weights, not torch.float32"
    assert amx_unavailable_reason(CPU, torch.bfloat16, 24, 32) == (
        "needs N a multiple of 16 and K of 32 (N=24, K=32)")
    assert amx_unavailable_reason(CPU, torch.bfloat16, 16, 48) == (
        "needs N a multiple of 16 and K of 32 (N=16, K=48)")


def test_a_cpu_without_amx_says_why(monkeypatch) -> None:
    class NoAmx:
        def microscale_amx_supported(self) -> int:
            return 0

    monkeypatch.setattr(cpu_amx, "load_cpu_library", lambda name, bind: (NoAmx(), None))
    cpu_amx._load.cache_clear()
    try:
        assert "lacks AMX-BF16" in cpu_amx._load()[1]
        with pytest.raises(RuntimeError, match="cannot run here: this CPU lacks AMX-BF16"):
            cpu_amx._library()
    finally:
        monkeypatch.undo()
        cpu_amx._load.cache_clear()


@needs_amx
def test_dense_linear_uses_it_for_bfloat16_weights(monkeypatch) -> None:
    x, w, bias = _operands(300, 32, 64, seed=3)
    calls = []
    monkeypatch.setattr(cpu_linear, "amx_linear", lambda x, w, b: calls.append(len(x)) or amx_linear(x, w, b))
    for rows in (1, 9, 300):
        out = dense_linear(x[:rows], w, bias)
        torch.testing.assert_close(out, F.linear(x[:rows], w, bias), rtol=2**-7, atol=2**-6)
    assert dense_linear(x[:6].view(2, 3, 64), w).shape == (2, 3, 32)
    with batch_invariant_mode():  # its rows are batch-invariant: deterministic mode takes it as it is
        dense_linear(x[:7], w, bias)
    assert calls == [1, 9, 300, 6, 7]
    dense_linear(x[:2].float(), w.float())  # float32: the vector kernel
    dense_linear(x[:2], w[:24])  # N not a multiple of 16
    dense_linear(x[:2], w.t().contiguous().t())  # a strided weight
    assert calls == [1, 9, 300, 6, 7]
    compiled = torch.compile(lambda x: dense_linear(x, w, bias), fullgraph=True, dynamic=False, backend="eager")
    with torch._dynamo.config.patch(disable=False):  # tests/conftest.py turns compiling off
        for rows in (3, 20):
            rows_in = x[:rows].clone()
            torch._dynamo.mark_dynamic(rows_in, 0)
            torch.testing.assert_close(compiled(rows_in), F.linear(rows_in, w, bias), rtol=2**-7, atol=2**-6)
    assert calls[-2:] == [3, 20]
