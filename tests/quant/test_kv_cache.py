"""Quantised KV cache storage: the int8, int4 and fp8 formulas (int4 against the scheme written out plainly),
caches that read back exactly what they wrote, static scales (from calibration amax, set before or after
allocation), and the model runner's KV cache API."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from microscale.engine.model_runner import ModelRunner
from microscale.layers.attention import Attention
from microscale.quant import kv_cache as kvq
from microscale.quant.kv_cache import (
    dequantize,
    dequantize_int4,
    int4_token_params,
    int8_token_scales,
    kv_scales_from_amax,
    make_kv_cache,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

CPU = torch.device("cpu")
KV_HEADS, DIM, BLOCK = 2, 16, 4


def sample(tokens: int = 40, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[tokens, kv_heads, dim] with magnitudes spread over six decades, and one all-zero vector."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, KV_HEADS, DIM, generator=gen) * 10 ** torch.randint(-3, 3, (tokens, KV_HEADS, 1),
                                                                                  generator=gen)
    x[3, 1] = 0
    return x.to(dtype)


# ---- formulas ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dynamic_round_trip_errs_by_at_most_half_a_step(dtype):
    x = sample(dtype=dtype)
    scale = int8_token_scales(x)
    assert scale.shape == (40, KV_HEADS) and scale.dtype == kvq.TOKEN_SCALE_DTYPE
    q = quantize_int8(x, scale)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    # The largest entry of each vector maps to +-127 (its scale is amax / 127, rounded to bfloat16).
    assert (q.abs().amax(dim=-1)[x.abs().amax(dim=-1) > 0] == 127).all()
    error = (dequantize(q, scale, torch.float32) - x.float()).abs()
    assert (error <= scale.float()[..., None] / 2 * (1 + 1e-6)).all()


def test_int8_zero_vectors_stay_zero():
    x = torch.zeros(3, KV_HEADS, DIM)
    scale = int8_token_scales(x)
    assert torch.equal(scale.float(), torch.ones(3, KV_HEADS))
    assert torch.equal(dequantize(quantize_int8(x, scale), scale, torch.float32), x)


def test_int8_static_scales_saturate():
    scale = torch.tensor([0.01, 1.0])  # per KV head
    x = torch.tensor([[[5.0, -0.5, 0.004]] * 2])  # [1 token, 2 heads, 3]
    q = quantize_int8(x, scale)
    assert q[0, 0].tolist() == [127, -50, 0] and q[0, 1].tolist() == [5, 0, 0]  # half-to-even: -0.5 -> 0


def plain_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 scheme written out plainly, one vector at a time in float64 (no bfloat16 parameters): 16 evenly
    spaced levels from the vector's min to its max, the nearest one taken (ties to even, as Python rounds).
    Returns (the values it gives back, its step per vector)."""
    flat = x.double().reshape(-1, x.shape[-1])
    out, steps = torch.empty_like(flat), torch.empty(len(flat), dtype=torch.float64)
    for i, vector in enumerate(flat.tolist()):
        lo, hi = min(vector), max(vector)
        step = (hi - lo) / 15 if hi > lo else 1.0
        out[i] = torch.tensor([lo + min(15, max(0, round((e - lo) / step))) * step for e in vector])
        steps[i] = step
    return out.view(x.shape), steps.view(x.shape[:-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_against_the_plain_scheme(dtype):
    x = sample(dtype=dtype)
    params = int4_token_params(x)
    assert params.shape == (40, KV_HEADS, 2) and params.dtype == kvq.TOKEN_SCALE_DTYPE
    packed = quantize_int4(x, params)
    assert packed.shape == (40, KV_HEADS, DIM // 2) and packed.dtype == torch.uint8
    # Two codes a byte, element 2j in the low nibble: each code is round((x - zero) / scale) clamped to 0..15.
    scale, zero = params.float().unbind(-1)
    codes = ((x.float() - zero[..., None]) / scale[..., None]).round().clamp(0, 15)
    assert torch.equal(packed.int(), (codes[..., 0::2] + 16 * codes[..., 1::2]).int())
    got = dequantize_int4(packed, params, torch.float64)
    assert torch.equal(got, (codes * scale[..., None] + zero[..., None]).double())
    # Against the plain scheme: each value within half a step, up to the bfloat16 rounding of the parameters
    # (zero point: 2^-9 of |min|; scale: 2^-9 of itself, over 15 steps), and mostly the very same level.
    expected, step = plain_int4(x)
    lo, hi = x.double().amin(dim=-1), x.double().amax(dim=-1)
    bound = step / 2 * (1 + 2**-8) + 2**-9 * (lo.abs() + hi - lo)
    assert ((got - x.double()).abs() <= bound[..., None]).all()
    assert ((expected - x.double()).abs() <= step[..., None] / 2 * (1 + 1e-9)).all()
    assert ((got - expected).abs() <= step[..., None] / 4).double().mean() > 0.97
    assert torch.equal(got[3, 1], torch.zeros(DIM, dtype=torch.float64))  # the all-zero vector stays zero


def test_int4_static_scales_use_the_symmetric_range():
    """One scale per head from calibration's amax: 16 levels over [-amax, amax], beyond which values clip."""
    amax = torch.tensor([3.0, 0.0])
    k_scale, _ = kv_scales_from_amax("int4", amax, amax)
    assert torch.allclose(k_scale, torch.tensor([0.4, 1.0]))
    cache = make_kv_cache("int4", KV_HEADS, 4, torch.float32, CPU)
    cache.set_scales(torch.tensor([0.4, 1.0]), torch.ones(KV_HEADS))
    scale = torch.tensor(0.4).to(torch.bfloat16).float()  # static scales are kept as bfloat16 values
    cache.allocate(2, BLOCK)
    x = torch.tensor([[[4.5, -9.0, 0.0, 0.7]] * 2])  # [1 token, 2 heads, 4]
    stored, _ = cache.write(x, x, *slots(1))
    assert torch.equal(stored[0, 0], torch.tensor([7.5, -7.5, 0.5, 1.5]) * scale)  # 0 is a tie: code 8
    assert torch.equal(stored[0, 1], torch.tensor([4.5, -7.5, 0.5, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matches_the_clamp_then_cast_formula(dtype):
    x = sample(dtype=dtype)
    scale = torch.tensor(0.05)
    expected = (x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    q = quantize_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))


def test_fp8_saturates_instead_of_nan():
    x = torch.tensor([[[1e4, -1e4, 448.0, 0.0]]])
    q = quantize_fp8(x, torch.tensor(1.0)).float()
    assert q.tolist() == [[[448.0, -448.0, 448.0, 0.0]]]


def test_scales_from_amax():
    k_amax, v_amax = torch.tensor([2.54, 0.0]), torch.tensor([1.27, 8.96])
    k_scale, v_scale = kv_scales_from_amax("int8", k_amax, v_amax)
    assert torch.allclose(k_scale, torch.tensor([0.02, 1.0])) and torch.allclose(v_scale, torch.tensor([0.01, 0.0706]),
                                                                                 atol=1e-4)
    k_scale, v_scale = kv_scales_from_amax("fp8", k_amax, v_amax)
    assert k_scale.shape == () and torch.allclose(k_scale, torch.tensor(2.54 / 448))
    assert torch.allclose(v_scale, torch.tensor(8.96 / 448))
    assert kv_scales_from_amax("fp8", torch.zeros(2), torch.zeros(2))[0] == 1.0
    with pytest.raises(ValueError, match="has no scales"):
        kv_scales_from_amax("none", k_amax, v_amax)


# ---- caches -----------------------------------------------------------------------------------------------

SCHEMES = [None, "int8", "int8-static", "int4", "int4-static", "fp8", "fp8-static"]


def make(scheme: str | None, dtype: torch.dtype = torch.float32, num_blocks: int = 12) -> kvq.KVCache:
    name = scheme.removesuffix("-static") if scheme else None
    cache = make_kv_cache(name, KV_HEADS, DIM, dtype, CPU)
    if scheme and scheme.endswith("-static"):
        amax = sample().abs().amax(dim=(0, 2))
        cache.set_scales(*kv_scales_from_amax(name, amax, amax / 2))
    cache.allocate(num_blocks, BLOCK)
    return cache


def slots(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(start, start + n)
    return positions // BLOCK, positions % BLOCK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_read_gives_back_exactly_what_write_returned(scheme, dtype):
    cache = make(scheme, dtype)
    k, v = sample(dtype=dtype), sample(dtype=dtype).flip(0)
    stored_k, stored_v = cache.write(k, v, *slots(40))
    assert stored_k.dtype == dtype
    keys, values = cache.read(torch.arange(10))
    assert torch.equal(keys.flatten(0, 1), stored_k) and torch.equal(values.flatten(0, 1), stored_v)
    # ... which is the scheme's formula applied to the new tokens.
    if scheme is None:
        expected = k
    elif scheme.startswith("int4"):
        params = int4_token_params(k) if scheme == "int4" else cache.static_params[0]
        expected = dequantize_int4(quantize_int4(k, params), params, dtype)
    else:
        scale = int8_token_scales(k) if scheme == "int8" else cache.static_scales[0]
        quantize = quantize_int8 if scheme.startswith("int8") else quantize_fp8
        expected = dequantize(quantize(k, scale), scale, dtype)
    assert torch.equal(stored_k, expected)


def test_bytes_per_token():
    per_value = {None: 4, "int8": 1, "int8-static": 1, "int4": 0.5, "int4-static": 0.5, "fp8": 1}
    # bfloat16 scale per token, key/value and KV head (int4: and a bfloat16 zero point)
    scales = {"int8": 2 * KV_HEADS * 2, "int4": 2 * KV_HEADS * 4}
    for scheme, size in per_value.items():
        expected = 2 * KV_HEADS * DIM * size + scales.get(scheme, 0)
        assert make(scheme).bytes_per_token() == expected, scheme
        # (allocating or not makes no difference)
    assert make_kv_cache("int8", KV_HEADS, DIM, torch.bfloat16, CPU).bytes_per_token() == 2 * KV_HEADS * (DIM + 2)
    # Llama-3.1-8B's layers (8 KV heads of 128): 4096 bytes a token in bfloat16, 1088 in int4 (3.76x the tokens).
    assert make_kv_cache("int4", 8, 128, torch.bfloat16, CPU).bytes_per_token() == 1088


def test_setting_static_scales_requantises_what_the_cache_holds():
    cache = make("int8", num_blocks=600)  # more blocks than one re-quantisation slice
    k, v = sample(2400), sample(2400).neg()
    cache.write(k, v, *slots(2400))
    before_k, before_v = cache.read(torch.arange(600))
    assert cache.token_scales is not None
    k_scale, v_scale = kv_scales_from_amax("int8", k.abs().amax(dim=(0, 2)), v.abs().amax(dim=(0, 2)))
    cache.set_scales(k_scale, v_scale)
    assert cache.token_scales is None and "per-head" in cache.describe()
    after_k, after_v = cache.read(torch.arange(600))
    assert torch.equal(after_k, dequantize(quantize_int8(before_k, k_scale), k_scale, torch.float32))
    assert torch.equal(after_v, dequantize(quantize_int8(before_v, v_scale), v_scale, torch.float32))
    # New tokens use the static scales.
    stored, _ = cache.write(k[:5], v[:5], *slots(5))
    assert torch.equal(stored, dequantize(quantize_int8(k[:5], k_scale), k_scale, torch.float32))


def test_fp8_scale_change_requantises():
    cache = make("fp8")
    k = sample()
    cache.write(k, k, *slots(40))
    before, _ = cache.read(torch.arange(10))
    cache.set_scales(torch.tensor([0.5]), torch.tensor(2.0))
    after, _ = cache.read(torch.arange(10))
    half = torch.tensor(0.5)
    assert torch.equal(after, dequantize(quantize_fp8(before, half), half, torch.float32))


def test_bad_scales_and_names_are_refused():
    with pytest.raises(ValueError, match=r"Unknown kv_cache_quant 'int3'; known: \['fp8', 'int4', 'int8', 'none'\]"):
        make_kv_cache("int3", KV_HEADS, DIM, torch.float32, CPU)
    with pytest.raises(ValueError, match="head_dim must be even"):
        make_kv_cache("int4", KV_HEADS, 15, torch.float32, CPU)
    with pytest.raises(ValueError, match="shape"):
        make("int8").set_scales(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        make("fp8").set_scales(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        make("int8").set_scales(torch.tensor([1.0, 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match="not quantised"):
        make(None).set_scales(torch.ones(2), torch.ones(2))


def test_fp8_without_float8_support_says_so(monkeypatch):
    monkeypatch.setattr(kvq, "_FP8", None)
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        make_kv_cache("fp8", KV_HEADS, DIM, torch.float32, CPU)


# ---- the model runner's KV cache API ----------------------------------------------------------------------


class _TwoLayerModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Attention(4, KV_HEADS, DIM, DIM**-0.5, None, i) for i in range(2))


def runner(kv_cache_quant: str | None, dtype: torch.dtype = torch.float32) -> ModelRunner:
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=KV_HEADS, head_dim=DIM)
    return ModelRunner(_TwoLayerModel(), config, CPU, dtype, max_num_seqs=2, max_model_len=32,
                       kv_cache_quant=kv_cache_quant)


def test_runner_sizes_and_describes_its_cache():
    assert runner(None).kv_block_bytes(16) == 2 * 2 * KV_HEADS * DIM * 4 * 16
    assert runner(None, torch.bfloat16).kv_cache_description() == "bfloat16"
    int8 = runner("int8")
    assert int8.kv_block_bytes(16) == 2 * 2 * KV_HEADS * (DIM + 2) * 16
    assert int8.kv_cache_description() == "int8, per-token scales"
    # Static scales set before allocation: no per-token scales to count.
    int8.set_kv_scales(0, torch.ones(KV_HEADS), torch.ones(KV_HEADS))
    assert int8.kv_block_bytes(16) == 2 * KV_HEADS * (2 * DIM + 2) * 16
    assert int8.kv_cache_description() == "int8, per-head scales; int8, per-token scales"
    fp8 = runner("fp8")
    assert fp8.kv_block_bytes(16) == 2 * 2 * KV_HEADS * DIM * 16
    assert fp8.kv_cache_description() == "fp8 e4m3, per-tensor scales"
    int4 = runner("int4")
    assert int4.kv_block_bytes(16) == 2 * 2 * KV_HEADS * (DIM // 2 + 4) * 16
    assert int4.kv_cache_description() == "int4, per-token scales and zero points"
    with pytest.raises(ValueError, match="known"):
        runner("int3")


def test_runner_binds_each_layer_its_cache_and_drops_stale_buffer_rows():
    r = runner("int8")
    r.allocate_kv_cache(num_blocks=16, block_size=BLOCK)
    assert [layer.kv_cache for layer in r.attention_layers] == r.kv_caches
    assert r.kv_caches[0].data.dtype == torch.int8 and r.kv_caches[0].data.shape == (2, 16, BLOCK, KV_HEADS, DIM)
    assert r.attention_backend.decode_buffer is not None
    r.attention_backend.decode_buffer.row_of, r.attention_backend.decode_buffer.length = {7: 0}, {7: 3}
    r.set_kv_scales(1, torch.full((KV_HEADS,), 0.1), torch.full((KV_HEADS,), 0.2))
    assert r.attention_backend.decode_buffer.row_of == {} and r.kv_caches[1].token_scales is None
