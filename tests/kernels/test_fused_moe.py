"""The Triton fused MoE (run through Triton's interpreter on CPU) against FusedMoE.forward, the torch reference,
on layers built with the real quant methods (16/32-bit experts and packed MXFP4), and its alignment step alone.

Tolerances, relative to the largest |output| of the case (values near 0 would make a pure rtol meaningless):
- float32: 1e-4 (both compute in float32; only summation order differs, ~1e-6 seen).
- bfloat16 / float16: 4 ulps of the dtype (2^-8 / 2^-11). Both round the pre-activations, h, the expert output
  and its weighted product to the dtype, but the oracle also rounds inside the activation (up to five times) and
  after each expert's index_add_, where the kernel sums the k weighted outputs in float32 and rounds once.
A wrong expert, row, weight or bias moves outputs by a sizeable fraction of the largest one.
"""

from __future__ import annotations

import pytest
import torch

from microscale.kernels.fused_moe import fused_moe, moe_align
from microscale.layers.activation import ClampedSwiGLU, SiluAndMul
from microscale.layers.moe import FusedMoE, route_top_k
from microscale.quant.mxfp4_experts import Mxfp4ExpertsMethod

H, I = 64, 64  # noqa: E741 - the intermediate size, as the model code names it
LIMIT, ALPHA = 3.0, 1.702  # a low limit so the gate and up clamps both bite at these scales
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}


def _layer(E: int, top_k: int, dtype: torch.dtype, mxfp4: bool, clamped: bool, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    activation = ClampedSwiGLU(LIMIT, ALPHA) if clamped else SiluAndMul()
    layer = FusedMoE(E, top_k, H, I, bias, dtype, activation, Mxfp4ExpertsMethod() if mxfp4 else None)
    # Pre-activations of std ~2.5 for unit inputs: past LIMIT often enough to exercise the clamps.
    w13 = 2.5 * torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(E, H, I, generator=gen) / I**0.5
    for name, w in (("w13", w13), ("w2", w2)):
        if mxfp4:
            layer.quant_method.load_weight(layer, name, w)  # packs with pack_mxfp4
        else:
            getattr(layer, name).data.copy_(w)
    if bias:
        layer.w13_bias.data.copy_(0.5 * torch.randn(E, 2 * I, generator=gen))
        layer.w2_bias.data.copy_(0.5 * torch.randn(E, H, generator=gen))
    return layer, w13


def _route(T: int, E: int, top_k: int, load: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """'random'; 'sparse': only top_k + 1 experts ever chosen (the rest get zero tokens); 'one': expert E - 1 is
    every token's first choice."""
    gen = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(T, E, generator=gen)
    if load == "sparse":
        logits[:, top_k + 1:] = -float("inf")
    elif load == "one":
        logits[:, E - 1] += 100.0
    return route_top_k(logits, top_k)


def _run(layer: FusedMoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    act = layer.activation
    spec = ("clamped_swiglu", act.limit, act.alpha) if isinstance(act, ClampedSwiGLU) else ("silu", 0.0, 0.0)
    if isinstance(layer.quant_method, Mxfp4ExpertsMethod):
        return fused_moe(x, weights, ids, layer.w13_blocks, layer.w2_blocks, layer.w13_bias, layer.w2_bias, spec,
                         layer.w13_scales, layer.w2_scales)
    return fused_moe(x, weights, ids, layer.w13, layer.w2, layer.w13_bias, layer.w2_bias, spec)


def _check(layer: FusedMoE, T: int, dtype: torch.dtype, weights: torch.Tensor, ids: torch.Tensor, seed: int = 0):
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    out = _run(layer, x, weights, ids)
    ref = layer(x, weights, ids)
    assert out.dtype == dtype and out.shape == (T, H)
    scale = ref.float().abs().max().item()
    assert scale > 0.1, "degenerate case: the reference output is ~0"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)
    return x


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("clamped", [False, True], ids=["silu", "clamped_swiglu"])
@pytest.mark.parametrize("mxfp4", [False, True], ids=["unquantised", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_oracle(dtype, mxfp4, clamped, bias):
    """T = 24, E = 8, top-2, with two experts getting no token at all."""
    E, top_k, T = 8, 2, 24
    layer, w13 = _layer(E, top_k, dtype, mxfp4, clamped, bias)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(3))
    logits[:, [2, 5]] = -float("inf")
    weights, ids = route_top_k(logits, top_k)
    x = _check(layer, T, dtype, weights, ids)
    if clamped:
        pre = torch.einsum("th,eoh->teo", x.float(), w13)
        assert (pre[..., :I] > LIMIT).any() and (pre[..., I:].abs() > LIMIT).any(), "the clamps are not exercised"


# (T, E, top_k, load). Covers top-k 1..4, T = 1 and 24, E = 4 and 8, and 64-row blocks (T * k > 16 * E).
ROUTING = [
    (1, 4, 1, "random"),
    (1, 8, 4, "random"),
    (24, 4, 4, "random"),  # 96 assignments over 4 experts: BLOCK_M = 64
    (24, 8, 1, "one"),  # one expert takes every token, the other seven none
    (24, 8, 3, "one"),
    (24, 8, 2, "sparse"),  # three experts used, five with zero tokens
    (24, 8, 4, "random"),
]


@pytest.mark.parametrize("T,E,top_k,load", ROUTING)
@pytest.mark.parametrize("mxfp4", [False, True], ids=["unquantised", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routing(dtype, mxfp4, T, E, top_k, load):
    layer, _ = _layer(E, top_k, dtype, mxfp4, clamped=True, bias=True, seed=T + E + top_k)
    weights, ids = _route(T, E, top_k, load, seed=T * E + top_k)
    if load == "one":
        assert (ids[:, 0] == E - 1).all()
    if load == "sparse" or top_k == 1:
        assert torch.bincount(ids.flatten(), minlength=E).min() == 0
    _check(layer, T, dtype, weights, ids.to(torch.int32) if top_k == 3 else ids)  # int32 ids are accepted too


def test_mxfp4_nan_scale_poisons_only_its_expert():
    """Scale byte 0xFF is NaN, as in unpack_mxfp4: an expert with one is NaN wherever it is used, others not."""
    layer, _ = _layer(4, 1, torch.float32, mxfp4=True, clamped=False, bias=False)
    layer.w2_scales.data[1, 0, 0] = 0xFF
    ids = torch.tensor([[0], [1], [2], [1], [3], [0]])
    out = _run(layer, torch.randn(6, H), torch.ones(6, 1), ids)
    # Only hidden unit 0 of expert 1 reads the NaN block (row 0 of w2, inputs 0..31).
    assert out[[1, 3], 0].isnan().all() and not out[[1, 3], 1:].isnan().any()
    assert not out[[0, 2, 4, 5]].isnan().any()


@pytest.mark.parametrize("mxfp4", [False, True], ids=["unquantised", "mxfp4"])
def test_assignments_held_elsewhere_are_skipped(mxfp4):
    """Expert parallelism: id E (an expert on another rank) adds nothing, a NaN-poisoned expert included, and the
    rest equals the oracle run with those assignments' weights at 0."""
    E, T = 4, 12
    layer, _ = _layer(E, 2, torch.float32, mxfp4=mxfp4, clamped=True, bias=True)
    weights, ids = _route(T, E, 2, "random")
    elsewhere = ids >= 2  # experts 2 and 3 live on the other rank
    if mxfp4:
        layer.w2_scales.data[2:] = 0xFF  # would poison every output they touch, were they run
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    out = _run(layer, x, weights, ids.masked_fill(elsewhere, E))
    ref = layer(x, weights.masked_fill(elsewhere, 0.0), ids.masked_fill(elsewhere, 0))
    assert elsewhere.any() and not elsewhere.all() and not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=TOLERANCE[torch.float32], atol=TOLERANCE[torch.float32])


def test_no_tokens():
    layer, _ = _layer(4, 2, torch.float32, mxfp4=False, clamped=False, bias=True)
    out = _run(layer, torch.zeros(0, H), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64))
    assert out.shape == (0, H)


@pytest.mark.parametrize("T,E,top_k,block_m", [(1, 8, 4, 16), (24, 8, 2, 16), (24, 4, 4, 64), (17, 8, 3, 16)])
@pytest.mark.parametrize("load", ["random", "sparse", "one"])
def test_moe_align(T, E, top_k, block_m, load):
    _, ids = _route(T, E, top_k, load, seed=T)
    n = T * top_k
    sorted_ids, block_expert = moe_align(ids, E, block_m)
    assert sorted_ids.dtype == block_expert.dtype == torch.int32
    assert sorted_ids.numel() == block_expert.numel() * block_m
    assert sorted_ids.numel() <= n + min(n, E) * (block_m - 1)
    valid = sorted_ids < n
    # Every assignment exactly once; everything else is padding, marked n.
    assert torch.equal(sorted_ids[valid].sort().values, torch.arange(n, dtype=torch.int32))
    assert (sorted_ids[~valid] == n).all()
    flat = ids.flatten()
    blocks = sorted_ids.view(-1, block_m)
    used = block_expert >= 0
    # Used blocks come first, then only padding blocks.
    assert torch.equal(used, torch.arange(len(used)) < used.sum())
    assert (blocks[~used] == n).all()
    counts = torch.bincount(flat, minlength=E)
    for b, expert in enumerate(block_expert.tolist()):
        rows = blocks[b][blocks[b] < n].long()
        if expert < 0:
            continue
        assert len(rows) > 0, "a block holds no assignment"
        assert (flat[rows] == expert).all(), "a block mixes experts"
    for expert in range(E):
        expert_blocks = (block_expert == expert).nonzero().flatten()
        assert len(expert_blocks) == -(-counts[expert].item() // block_m)  # none for experts with no token
        if len(expert_blocks):
            assert torch.equal(expert_blocks, torch.arange(expert_blocks[0], expert_blocks[-1] + 1))
            rows = blocks[expert_blocks].flatten()
            rows = rows[rows < n]
            assert (rows[:-1] < rows[1:]).all(), "tokens out of order within an expert (the sort is not stable)"
    # Runs are in expert order.
    assert (block_expert[used][1:] >= block_expert[used][:-1]).all()
