"""Norms, activations and MoE pick their kernel once, from the candidates of the kernel family (as quantized
Linears do), and their forward runs what was picked."""

from __future__ import annotations

import pytest
import torch

from microscale.kernels.candidates import Candidate, always, pick_for_family
from microscale.layers.activation import ClampedSwiGLU, SiluAndMul
from microscale.layers.moe import FusedMoE
from microscale.layers.norm import RMSNorm

CPU = torch.device("cpu")  # Triton runs here through the interpreter (tests/conftest.py)


def _modules():
    return [RMSNorm(8, 1e-5, torch.float32), SiluAndMul(), ClampedSwiGLU(7.0, 1.702),
            FusedMoE(4, 2, 8, 16, False, torch.float32, SiluAndMul())]


def test_pick_for_family():
    fast = Candidate("fast", lambda device: "not here", lambda: "fast")
    faster = Candidate("faster", always, lambda: "faster")
    reference = Candidate("reference", always, lambda: "reference")
    assert pick_for_family("op", "torch", [faster], reference, CPU) is reference
    assert pick_for_family("op", "triton", [fast, faster], reference, CPU) is faster
    assert pick_for_family("op", "triton", [fast], reference, CPU) is reference


@pytest.mark.parametrize("module", _modules(), ids=lambda m: type(m).__name__)
def test_each_family_picks_its_own_kernel_once(module):
    reference = module.kernel  # before the runner picks: the torch reference
    module.select_kernels("torch", CPU)
    assert module.kernel is reference
    if isinstance(module, FusedMoE):
        assert not module.fused  # the reference reads expert counts on the host
    module.select_kernels("triton", CPU)
    assert module.kernel is not reference
    if isinstance(module, FusedMoE):
        assert module.fused


@pytest.mark.parametrize("module", _modules(), ids=lambda m: type(m).__name__)
def test_forward_runs_the_picked_kernel(module):
    calls = []
    module.kernel = lambda layer, *args: calls.append((layer, args)) or "picked"
    args = (torch.randn(3, 8), torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64))
    if isinstance(module, (SiluAndMul, ClampedSwiGLU)):
        args = (torch.randn(3, 16),)
    elif isinstance(module, RMSNorm):
        args = (torch.randn(3, 8),)
    assert module(*args) == "picked"
    assert len(calls) == 1 and calls[0][0] is module
