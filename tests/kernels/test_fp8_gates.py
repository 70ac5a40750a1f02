"""Triton rejects float8e4nv below sm_89 (A100 is sm_80): every op that would store or convert FP8 in a Triton
kernel is refused there up front, with a reason, and falls back to a path that works. The GPU is stood in for by
torch.cuda.get_device_capability; the kernels themselves run through the interpreter."""

from __future__ import annotations

import pytest
import torch

from microscale.attention.selector import select_attention_backend
from microscale.attention.torch_backend import TorchAttentionBackend
from microscale.kernels.selector import fp8_unavailable_reason
from microscale.layers.activation import SiluAndMul
from microscale.layers.norm import RMSNorm

GPU = torch.device("cuda", 0)


@pytest.fixture
def capability(monkeypatch):
    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))

    return set_capability


@pytest.mark.parametrize("cap, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False),
                                          ((10, 0), False)])
def test_fp8_gate_by_capability(capability, cap, refused):
    capability(*cap)
    reason = fp8_unavailable_reason(GPU)
    assert (reason is not None) == refused, reason
    if refused:
        assert f"{cap[0]}.{cap[1]}" in reason and "8.9" in reason


def _fp8_outputs(norm: RMSNorm, act: SiluAndMul, fused: bool) -> list[torch.Tensor]:
    for module in (norm, act):
        module.select_kernels("triton", GPU)
        assert module.fused_fp8_output is fused
    torch.manual_seed(1)
    x, residual = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
    scale = torch.tensor(0.05)
    normed, new_residual = norm(x, residual, fp8_scale=scale)
    assert torch.equal(new_residual, x + residual)
    return [normed, act(torch.randn(5, 128, dtype=torch.bfloat16), fp8_scale=scale)]


def test_norm_and_swiglu_quantise_after_the_kernel_below_sm89(capability):
    """sm_80: the kernel writes 16-bit and torch quantises it; the bytes are those the fused kernel emits on sm_90
    (both round the same 16-bit value to nearest-even)."""
    torch.manual_seed(0)
    norm, act = RMSNorm(64, 1e-5, torch.bfloat16), SiluAndMul()
    norm.weight.data.normal_()
    capability(8, 0)
    after = _fp8_outputs(norm, act, fused=False)
    capability(9, 0)
    fused = _fp8_outputs(norm, act, fused=True)
    for a, b in zip(after, fused):
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("cap, kv, triton", [((8, 0), "fp8", False), ((8, 0), "int8", True), ((8, 0), None, True),
                                             ((8, 9), "fp8", True), ((9, 0), "fp8", True)])
def test_fp8_kv_cache_keeps_attention_on_torch_below_sm89(capability, caplog, cap, kv, triton):
    capability(*cap)
    with caplog.at_level("INFO", logger="microscale"):
        backend = select_attention_backend(GPU, "triton", kv)
    assert (backend.name == "triton") == triton
    if not triton:
        assert isinstance(backend, TorchAttentionBackend)
        assert "8.9+" in caplog.text and "FP8 KV cache" in caplog.text
