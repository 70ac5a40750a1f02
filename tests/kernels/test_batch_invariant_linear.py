"""The batch-invariant linear: a row's result is bit-identical whatever rows share its matmul (plain F.linear
is not on CPU BLAS), and the mode is scoped to its block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microscale.kernels.batch_invariant import batch_invariant_mode, linear, pad_rows

SHAPES = [(64, 192), (2048, 64), (1024, 512)]  # (K, N): thin, deep (K >= 2048), wide


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", SHAPES)
def test_row_results_do_not_depend_on_the_batch(dtype, k, n):
    torch.manual_seed(0)
    weight, bias = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    rows = torch.randn(300, k).to(dtype)
    with batch_invariant_mode():
        alone = linear(rows[:1], weight, bias)[0]
        for m in (2, 7, 9, 33, 300):
            batch = rows[:m].clone()
            batch[[0, m // 2]] = batch[[m // 2, 0]]  # the row of interest in the middle of the batch
            assert torch.equal(linear(batch, weight, bias)[m // 2], alone), m
            assert torch.allclose(linear(batch, weight, bias), F.linear(batch, weight, bias), atol=1e-2, rtol=1e-2)


def test_mode_is_scoped_to_its_block_and_keeps_leading_dims():
    x, weight = torch.randn(2, 3, 16), torch.randn(5, 16)
    with batch_invariant_mode():
        assert linear(x, weight).shape == (2, 3, 5)
        assert linear(x[:0], weight).shape == (0, 3, 5)
        with batch_invariant_mode(False):
            assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_pad_rows():
    x = torch.ones(3, 5)
    assert pad_rows(x).shape == (8, 5) and pad_rows(x)[3:].eq(0).all()
    assert pad_rows(x, 5, dim=1) is x
    assert pad_rows(torch.ones(2, 6), 4, dim=1).shape == (2, 8)
