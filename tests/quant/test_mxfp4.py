"""MXFP4 (OCP MX v1.0): the E2M1 codes, ties-to-even rounding, saturation, E8M0 scale edge cases and
NaN/Inf, round-trip error bounds, agreement with transformers' gpt-oss dequantisation, and the W4A16 Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from microscale.layers.linear import Linear
from microscale.quant import mxfp4
from microscale.quant.format import weight_format
from microscale.quant.mxfp4 import MXFP4_BLOCK, pack_mxfp4, unpack_mxfp4
from microscale.quant.mxfp4_linear import Mxfp4LinearMethod

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


def codes_of(blocks: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] bytes -> [..., G * 32] codes, element 2j from the low nibble."""
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1)
    return codes.reshape(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that comparisons see -0.0 and NaN payloads too."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> 2^(s - 127) in float64 (exact)."""
    return torch.ldexp(torch.ones(scales.shape, dtype=torch.float64), scales.int() - 127)


def one_block(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (MXFP4_BLOCK - len(values)), dtype=dtype)


@pytest.mark.parametrize("k", [-127, -126, -100, -3, 0, 7, 125])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_code_round_trips_exactly(k: int, dtype: torch.dtype) -> None:
    x = torch.ldexp(E2M1.repeat(2), torch.tensor(k)).to(dtype)  # all 16 values twice, times 2^k
    blocks, scales = pack_mxfp4(x)
    assert blocks.shape == (1, 16) and scales.shape == (1,)
    assert scales.item() == k + 127  # amax 6 * 2^k: floor(log2) - 2 = k
    assert torch.equal(codes_of(blocks), torch.arange(16, dtype=torch.uint8).repeat(2))
    assert blocks[0, 0].item() == 0x10  # codes 0 and 1: element 0 in the low nibble
    for out_dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(bits(unpack_mxfp4(blocks, scales, out_dtype)), bits(x.to(out_dtype)))


@pytest.mark.parametrize("scale_exp", [0, -10, 20])
def test_rounding_is_to_nearest_ties_to_even(scale_exp: int) -> None:
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    above = torch.nextafter(torch.tensor(ties), torch.tensor(9.0)).tolist()  # just past each midpoint
    above_expected = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    below = torch.nextafter(torch.tensor(ties), torch.tensor(0.0)).tolist()
    below_expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    values = ties + [-t for t in ties] + above + below  # 28 values, amax 5.x: scale exponent 0
    want = expected + [-e for e in expected] + above_expected + below_expected
    scale = 2.0**scale_exp
    x = one_block(values) * scale
    blocks, scales = pack_mxfp4(x)
    assert scales.item() == 127 + scale_exp
    got = unpack_mxfp4(blocks, scales, torch.float32)[:28]
    assert torch.equal(got, torch.tensor(want) * scale)
    # Ties that round to zero from below keep their sign: -0.25 -> -0.0 (code 8).
    assert codes_of(blocks)[7].item() == 8


def test_saturates_at_six_times_the_scale() -> None:
    # amax 7.99: scale 2^(2 - 2) = 1, so everything in (6, 8) clamps to +-6 (spec 6.3: clamp, keep sign).
    x = one_block([7.99, 6.0001, 7.0, -7.5, -6.5, 6.9, 5.0])
    blocks, scales = pack_mxfp4(x)
    assert scales.item() == 127
    got = unpack_mxfp4(blocks, scales, torch.float32)[:7]
    assert torch.equal(got, torch.tensor([6.0, 6.0, 6.0, -6.0, -6.0, 6.0, 4.0]))

    torch.manual_seed(0)
    x = torch.randn(16, 256) * torch.rand(16, 8).repeat_interleave(32, dim=1).exp2().mul(50)
    blocks, scales = pack_mxfp4(x)
    y = unpack_mxfp4(blocks, scales, torch.float32).view(16, 8, 32)
    limit = 6 * scale_values(scales)
    assert (y.abs() <= limit.unsqueeze(-1)).all()


def test_all_zero_block_gets_the_smallest_scale() -> None:
    x = torch.zeros(2, 64)
    x[1, :32] = -0.0
    blocks, scales = pack_mxfp4(x)
    assert torch.equal(scales, torch.zeros(2, 2, dtype=torch.uint8))  # 2^-127: E8M0 has no zero
    assert torch.equal(codes_of(blocks[1])[:32], torch.full((32,), 8, dtype=torch.uint8))  # -0.0 kept
    assert torch.equal(bits(unpack_mxfp4(blocks, scales, torch.float32)), bits(x))


def test_subnormal_inputs_use_the_lowest_scale() -> None:
    tiny = 2.0**-149  # the smallest float32 subnormal
    x = one_block([1.5 * 2.0**-126, 2.0**-128, -(2.0**-127), 1e-40, tiny])
    blocks, scales = pack_mxfp4(x)
    assert scales.item() == 0  # floor(log2(1.5 * 2^-126)) - 2 = -128, clamped to -127
    got = unpack_mxfp4(blocks, scales, torch.float32)[:5]
    assert torch.equal(got, torch.tensor([1.5 * 2.0**-126, 2.0**-128, -(2.0**-127), 0.0, 0.0]))
    # A block of subnormals only: all below half of 2^-128, so all round to zero.
    blocks, scales = pack_mxfp4(one_block([1e-40, -1e-40, tiny]))
    assert scales.item() == 0
    assert torch.equal(bits(unpack_mxfp4(blocks, scales, torch.float32)[:3]), bits(torch.tensor([0.0, -0.0, 0.0])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_largest_finite_values(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    x = one_block([big, -big, big / 2], dtype)
    blocks, scales = pack_mxfp4(x)
    exp = int(torch.tensor(big, dtype=torch.float64).log2().floor())  # 127 (float32/bfloat16), 15 (float16)
    assert scales.item() == 127 + exp - 2  # the E8M0 top clamp (127) is out of reach of 16/32-bit inputs
    got = unpack_mxfp4(blocks, scales, torch.float32)[:3]
    assert torch.equal(got, torch.tensor([6.0, -6.0, 4.0], dtype=torch.float64).mul(2.0 ** (exp - 2)).float())
    blocks, scales = pack_mxfp4(one_block([3e38, 1e38]))
    assert scales.item() == 252
    assert unpack_mxfp4(blocks, scales, torch.float32)[:2].tolist() == [6 * 2.0**125, 2 * 2.0**125]  # 1e38: 2.35


@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_make_the_block_nan(special: float) -> None:
    # E2M1 cannot encode NaN or Inf; E8M0's NaN (0xFF) marks the whole block NaN (spec 5.4.1, 6.3).
    x = torch.randn(2, 96)
    x[1, 40] = special
    blocks, scales = pack_mxfp4(x)
    assert scales[1, 1].item() == 0xFF and (blocks[1, 1] == 0).all()
    assert (scales[0] != 0xFF).all() and scales[1, 0] != 0xFF and scales[1, 2] != 0xFF
    for dtype in (torch.float32, torch.bfloat16):
        y = unpack_mxfp4(blocks, scales, dtype)
        assert y[1, 32:64].isnan().all()
        assert not y[0].isnan().any() and not y[1, :32].isnan().any() and not y[1, 64:].isnan().any()


def test_unpack_nan_scale_whatever_the_codes() -> None:
    blocks = torch.randint(0, 256, (3, 2, 16), dtype=torch.uint8)
    scales = torch.tensor([[0xFF, 127], [127, 0xFF], [0, 254]], dtype=torch.uint8)
    y = unpack_mxfp4(blocks, scales, torch.float32)
    assert y.shape == (3, 64)
    assert y[0, :32].isnan().all() and y[1, 32:].isnan().all()
    assert not y[0, 32:].isnan().any() and not y[2].isnan().any()


def _half_step(q: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid step around |q| (|q| <= 6): 0.25 below 2, 0.5 below 4, 1 up to 6."""
    a = q.abs()
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_round_trip_error_and_idempotence(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    magnitude = torch.randint(-12, 12, (8, 3, 1)).float().exp2()  # a different scale per block
    x = (torch.randn(8, 3, 32) * magnitude).reshape(8, 96).to(dtype)
    blocks, scales = pack_mxfp4(x)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = unpack_mxfp4(blocks, scales, out_dtype)
        assert y.dtype == out_dtype and y.shape == x.shape
        scale = scale_values(scales).repeat_interleave(32, dim=1)
        q = x.double() / scale
        err = (y.double() - x.double()).abs()
        inside = q.abs() <= 6
        assert (err[inside] <= _half_step(q[inside]) * scale[inside]).all()
        # Beyond 6 * scale (the spec's floor rule lets amax reach 8 * scale): saturated, sign kept.
        assert torch.equal(y.double()[~inside], 6 * scale[~inside] * q[~inside].sign())
        assert (~inside).any() and inside.any()
        again = pack_mxfp4(y)
        assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_shapes_chunking_and_non_contiguous_input(monkeypatch) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    blocks, scales = pack_mxfp4(x)
    assert blocks.shape == (3, 5, 4, 16) and scales.shape == (3, 5, 4)
    assert unpack_mxfp4(blocks, scales).shape == (3, 5, 128)
    monkeypatch.setattr(mxfp4, "_CHUNK_BLOCKS", 7)  # chunk boundaries inside rows
    small = pack_mxfp4(x)
    assert torch.equal(small[0], blocks) and torch.equal(small[1], scales)
    assert torch.equal(unpack_mxfp4(blocks, scales), unpack_mxfp4(*pack_mxfp4(x)))
    t = torch.randn(64, 5).t()  # non-contiguous [5, 64]
    tb, ts = pack_mxfp4(t)
    cb, cs = pack_mxfp4(t.contiguous())
    assert torch.equal(tb, cb) and torch.equal(ts, cs)
    assert torch.equal(unpack_mxfp4(tb.transpose(0, 1).contiguous().transpose(0, 1), ts), unpack_mxfp4(cb, cs))


def test_pack_does_not_modify_its_input() -> None:
    x = torch.randn(4, 64)
    before = x.clone()
    pack_mxfp4(x)
    assert torch.equal(x, before)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        pack_mxfp4(torch.randn(4, 48))
    with pytest.raises(TypeError):
        pack_mxfp4(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not match"):
        unpack_mxfp4(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_transformers_dequantisation(dtype: torch.dtype) -> None:
    hf = pytest.importorskip("transformers.integrations.mxfp4")
    gen = torch.Generator().manual_seed(3)
    experts, rows, groups = 2, 8, 3
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (experts, rows, groups), dtype=torch.uint8, generator=gen)  # no NaN scale
    scales[0, 0] = torch.tensor([0, 254, 127], dtype=torch.uint8)  # both ends of E8M0's range
    theirs = hf.convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert theirs.shape == (experts, groups * 32, rows)  # transformers transposes to [E, in, out]
    ours = unpack_mxfp4(blocks, scales, dtype)
    assert ours.shape == (experts, rows, groups * 32)
    assert torch.equal(bits(ours), bits(theirs.transpose(1, 2).contiguous()))


# ---- the W4A16 Linear method -----------------------------------------------------------------------------


def test_mxfp4_is_registered() -> None:
    assert isinstance(weight_format("mxfp4").linear_method(), Mxfp4LinearMethod)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_loads_float_shards_and_matches_dequantised_weights(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    layer = Linear(64, [32, 48], bias=True, dtype=dtype, quant_method=Mxfp4LinearMethod())
    assert dict(layer.named_parameters()).keys() == {"weight_blocks", "weight_scales", "bias"}
    for p in layer.parameters():
        assert not p.requires_grad and hasattr(p, "weight_loader")
    w = [torch.randn(32, 64, dtype=dtype), torch.randn(48, 64, dtype=dtype)]
    b = [torch.randn(32, dtype=dtype), torch.randn(48, dtype=dtype)]
    for shard in (1, 0):  # any order
        assert layer.load_weight("weight", w[shard], shard) == ["weight_blocks", "weight_scales"]
        assert layer.load_weight("bias", b[shard], shard) == ["bias"]

    x = torch.randn(5, 64, dtype=dtype)
    expected = F.linear(x, unpack_mxfp4(*pack_mxfp4(torch.cat(w)), dtype), torch.cat(b))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    packed = layer.weight_blocks.nbytes + layer.weight_scales.nbytes
    assert packed <= 0.3 * (80 * 64 * 2)  # against the bf16 weight

    # A checkpoint already in MXFP4 loads by the packed names, shard by shard.
    prepacked = Linear(64, [32, 48], bias=True, dtype=dtype, quant_method=Mxfp4LinearMethod())
    for shard in (0, 1):
        wb, ws = pack_mxfp4(w[shard])
        assert prepacked.load_weight("weight_blocks", wb, shard) == ["weight_blocks"]
        assert prepacked.load_weight("weight_scales", ws, shard) == ["weight_scales"]
        prepacked.load_weight("bias", b[shard], shard)
    torch.testing.assert_close(prepacked(x), expected, rtol=0, atol=0)


def test_linear_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        Linear(48, 16, quant_method=Mxfp4LinearMethod())
    layer = Linear(64, [32, 48], quant_method=Mxfp4LinearMethod())
    assert layer.bias is None
    with pytest.raises(ValueError):
        layer.load_weight("weight", torch.randn(32, 96), 0)  # wrong input size
    with pytest.raises(ValueError):
        layer.load_weight("weight", torch.randn(40, 64), 0)  # wrong shard rows
    with pytest.raises(ValueError):
        layer.load_weight("weight_scales", torch.zeros(32, 3, dtype=torch.uint8), 0)


def test_unpack_into_out_buffer() -> None:
    blocks, scales = pack_mxfp4(torch.randn(3, 64))
    out = torch.full((3, 64), float("nan"), dtype=torch.bfloat16)
    assert unpack_mxfp4(blocks, scales, torch.bfloat16, out=out) is out
    assert torch.equal(out, unpack_mxfp4(blocks, scales, torch.bfloat16))
    for bad in (torch.empty(3, 64), torch.empty(64, 3, dtype=torch.bfloat16).t(), torch.empty(3, 32)):
        with pytest.raises(ValueError, match="out must be"):
            unpack_mxfp4(blocks, scales, torch.bfloat16, out=bad)
