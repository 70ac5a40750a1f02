"""FP8 (E4M3): storage identical to torch.float8_e4m3fn, the static and dynamic Linear methods against
their definitions, the matmul each layer picks per scale shapes, dtype and GPU (choices made as on sm80 / sm89
/ sm90, the arguments handed to torch._scaled_mm run by its CPU build against the reference), the
QuantConfig / CalibConfig API, compressed-tensors checkpoints (written, reloaded without recalibrating, and
written by "another tool"), and the errors users get."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLED_MODEL, REPO
from safetensors.torch import load_file, save_file

from microscale import LLM, CalibConfig, QuantAlgo, QuantConfig
from microscale.kernels import candidates
from microscale.kernels.fp8_gemm import fp8_gemm_unavailable_reason  # imported (jitted) while interpreting
from microscale.layers.linear import Linear
from microscale.quant.fp8 import (
    FP8_MAX,
    Fp8DynamicMethod,
    Fp8StaticMethod,
    dequantize_fp8_weight,
    fp8_scale,
    quantize_fp8,
)

TEXT = (REPO / "data" / "pycode-valid.txt").read_text()


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT[-100_000:])  # away from the start of the file, where the accuracy tests score
    return path


def calib(path, batches: int = 8) -> CalibConfig:
    return CalibConfig(calib_dataset=str(path), calib_batches=batches, calib_max_seq_length=256)


def test_storage_is_torch_float8_with_saturation() -> None:
    every_fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = every_fp8[~every_fp8.float().isnan()].float()
    assert torch.equal(quantize_fp8(finite, 1.0).float(), finite)  # every finite E4M3 value round-trips
    x = torch.randn(4096) * 300
    scale = torch.tensor(0.37)
    expected = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    got = quantize_fp8(x, scale)
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert quantize_fp8(torch.tensor([1e6, -1e6]), 1.0).float().tolist() == [FP8_MAX, -FP8_MAX]  # not NaN
    assert fp8_scale(torch.tensor(0.0)) > 0  # all-zero tensors still get a usable scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_decoding_is_exact(dtype) -> None:
    every_byte_pair = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float8_e4m3fn)
    weight = every_byte_pair.view(256, 512)
    decoded = dequantize_fp8_weight(weight, dtype)
    assert torch.equal(decoded.nan_to_num(7.0), weight.to(dtype).nan_to_num(7.0))
    odd = weight[:, :511]  # not contiguous: torch's own conversion
    assert torch.equal(dequantize_fp8_weight(odd, dtype).nan_to_num(7.0), odd.to(dtype).nan_to_num(7.0))


def _linear(method, shards=(32, 48), bias=True, dtype=torch.float32, k=64):
    torch.manual_seed(0)
    layer = Linear(k, list(shards), bias=bias, dtype=dtype, quant_method=method)
    weights = [torch.randn(rows, k) * (i + 1) for i, rows in enumerate(shards)]  # shards of different ranges
    for i, w in enumerate(weights):
        layer.load_weight("weight", w, i)
    b = torch.randn(sum(shards))
    if bias:
        layer.load_weight("bias", b)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, weights, b


def test_static_method_matches_its_definition() -> None:
    layer, weights, b = _linear(Fp8StaticMethod())
    x = torch.randn(5, 64)
    layer.quant_method.set_input_scale(layer, fp8_scale(x.abs().amax()))
    # Definition: each shard's weight with its own per-tensor scale; the input with the static scale.
    w_scales = [fp8_scale(w.abs().amax()) for w in weights]
    w_deq = torch.cat([quantize_fp8(w, s).float() * s for w, s in zip(weights, w_scales)])
    x_scale = fp8_scale(x.abs().amax())
    x_deq = quantize_fp8(x, x_scale).float() * x_scale
    assert torch.allclose(layer(x), F.linear(x_deq, w_deq, b), atol=1e-5, rtol=1e-5)
    exact = F.linear(x, torch.cat(weights), b)
    assert (layer(x) - exact).norm() < 0.05 * exact.norm()  # and close to the unquantized layer


def test_dynamic_method_matches_its_definition() -> None:
    layer, weights, b = _linear(Fp8DynamicMethod())
    w = torch.cat(weights)
    w_scale = fp8_scale(w.abs().amax(dim=1, keepdim=True))
    x = torch.randn(5, 64) * torch.linspace(0.1, 10, 5)[:, None]  # tokens of very different ranges
    x_scale = fp8_scale(x.abs().amax(dim=1, keepdim=True))
    expected = F.linear(quantize_fp8(x, x_scale).float() * x_scale, quantize_fp8(w, w_scale).float() * w_scale, b)
    # Same products; the scales apply before or after the sums, so only float32 rounding differs.
    assert torch.allclose(layer(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SM80, SM89, SM90 = (8, 0), (8, 9), (9, 0)
CUDA = torch.device("cuda", 0)


def _prequantized(method, shard_scales, dtype):
    """Loaded from FP8 tensors and their scales, as from a pre-quantized checkpoint: static ones get the scale of
    each shard from `shard_scales`, dynamic ones a scale per row."""
    static = isinstance(method, Fp8StaticMethod)
    layer = Linear(64, [32, 48], bias=True, dtype=dtype, quant_method=method)
    gen = torch.Generator().manual_seed(1)
    for shard, (rows, scale) in enumerate(zip((32, 48), shard_scales)):
        w = torch.randn(rows, 64, generator=gen) * 0.05 * scale
        w_scale = torch.tensor(5e-4 * scale) if static else fp8_scale(w.abs().amax(dim=1, keepdim=True))
        layer.load_weight("weight", quantize_fp8(w, w_scale), shard)
        layer.load_weight("weight_scale", w_scale, shard)
        if static:
            layer.load_weight("input_scale", torch.tensor(0.02), shard)
    layer.load_weight("bias", torch.randn(80, generator=gen))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _calibrated(layer):
    layer.quant_method.set_input_scale(layer, torch.tensor(0.02))
    return layer


# Every layer has N = 80 and K = 64 (multiples of 16) and a bias, unless named otherwise.
LAYERS = {
    # static: one activation scale []; shards of different scales make a weight scale per row [N]
    "static-shards": lambda dtype: _calibrated(_linear(Fp8StaticMethod(), dtype=dtype)[0]),
    "static-one-shard": lambda dtype: _calibrated(_linear(Fp8StaticMethod(), shards=(80,), dtype=dtype)[0]),
    "static-no-bias": lambda dtype: _calibrated(_linear(Fp8StaticMethod(), shards=(80,), bias=False, dtype=dtype)[0]),
    "prequantized-same-scales": lambda dtype: _prequantized(Fp8StaticMethod(prequantized=True), (1, 1), dtype),
    "prequantized-shard-scales": lambda dtype: _prequantized(Fp8StaticMethod(prequantized=True), (1, 3), dtype),
    # dynamic: per-token activation scales [M, 1], per-channel weight scales [N]
    "dynamic": lambda dtype: _linear(Fp8DynamicMethod(), dtype=dtype)[0],
    "dynamic-prequantized": lambda dtype: _prequantized(Fp8DynamicMethod(prequantized=True), (1, 3), dtype),
    "dynamic-k40": lambda dtype: _linear(Fp8DynamicMethod(), dtype=dtype, k=40)[0],
    "dynamic-n40": lambda dtype: _linear(Fp8DynamicMethod(), shards=(40,), dtype=dtype)[0],
}


def _picked(layer) -> str:
    fn = layer.fp8_matmul
    return getattr(fn, "func", fn).__name__  # the weight decoded at load is bound to its function


def _select_on_gpu(layer, capability, family: str = "triton") -> str:
    """Pick the layer's kernel as on a CUDA GPU of this compute capability (choosing reads nothing else from it;
    the Triton interpreter is off meanwhile, as on a GPU, and back on to run the picked kernel here)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        layer.quant_method.select_kernel(layer, family, CUDA)
        triton_reason = fp8_gemm_unavailable_reason(CUDA)
    return _picked(layer), triton_reason


@pytest.mark.parametrize(("layer", "capability", "dtype", "kernel"), [
    ("static-shards", SM90, BF16, "scaled_mm_rowwise"),  # the activation scale repeated per row
    ("static-shards", SM89, BF16, "scaled_mm_rowwise"),
    ("static-shards", SM90, FP16, "_triton_matmul"),  # row-wise _scaled_mm may write bfloat16 only
    ("static-shards", SM90, FP32, "_triton_matmul"),
    ("static-shards", SM80, BF16, "_matmul_decoded"),  # no FP8 multiply before sm89
    ("static-one-shard", SM90, BF16, "scaled_mm_per_tensor"),
    ("static-one-shard", SM90, FP16, "scaled_mm_per_tensor"),
    ("static-one-shard", SM89, FP16, "scaled_mm_per_tensor"),
    ("static-one-shard", SM90, FP32, "_triton_matmul"),  # _scaled_mm takes no bias with float32 outputs
    ("static-no-bias", SM90, FP32, "scaled_mm_per_tensor"),
    ("static-one-shard", SM80, FP16, "_matmul_decoded"),
    ("prequantized-same-scales", SM90, FP16, "scaled_mm_per_tensor"),  # q/k/v shards sharing one scale
    ("prequantized-shard-scales", SM90, BF16, "scaled_mm_rowwise"),
    ("prequantized-shard-scales", SM90, FP16, "_triton_matmul"),
    ("prequantized-shard-scales", SM80, BF16, "_matmul_decoded"),
    ("dynamic", SM90, BF16, "scaled_mm_rowwise"),
    ("dynamic", SM89, BF16, "scaled_mm_rowwise"),
    ("dynamic", SM90, FP16, "_triton_matmul"),
    ("dynamic", SM90, FP32, "_triton_matmul"),
    ("dynamic", SM80, BF16, "_matmul_decoded"),
    ("dynamic-prequantized", SM90, BF16, "scaled_mm_rowwise"),
    ("dynamic-k40", SM90, BF16, "_triton_matmul"),  # _scaled_mm needs K and N multiples of 16
    ("dynamic-n40", SM90, BF16, "_triton_matmul"),
])
def test_kernel_choice(layer, capability, dtype, kernel) -> None:
    linear = LAYERS[layer](dtype)
    assert _select_on_gpu(linear, capability)[0] == kernel
    assert _select_on_gpu(linear, capability, "torch")[0] == "fp8_matmul_reference"  # that family's only one


def test_choice_logs_what_was_skipped_and_why(monkeypatch, caplog) -> None:
    monkeypatch.setattr(candidates, "_logged", set())
    layer = LAYERS["dynamic"](BF16)
    with caplog.at_level(logging.INFO, logger=candidates.__name__):
        _, triton_reason = _select_on_gpu(layer, SM80)
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("FP8 linear (per-token x, per-row w, N=80, K=64, bfloat16, bias): torch F.linear on the "
                           "weight decoded once at load")
    sm80 = "needs FP8 tensor cores: compute capability 8.9+ (this GPU is 8.0)"
    assert f"(torch._scaled_mm per-tensor (cuBLAS) skipped: {sm80})" in line
    assert f"(torch._scaled_mm row-wise skipped: {sm80})" in line
    assert f"(triton FP8 GEMM skipped: {triton_reason})" in line
    assert layer.fp8_matmul.args[0].dtype == BF16  # decoded when picked, before the KV cache takes the memory


# Largest |picked - reference| as a fraction of the output's largest |value|: a few roundings of each dtype.
TOLERANCE = {FP32: 1e-5, BF16: 4 * 2**-8, FP16: 4 * 2**-11}


@pytest.mark.parametrize("m", [1, 2, 16, 33])
@pytest.mark.parametrize(("layer", "capability", "dtype", "scale_shapes"), [
    ("static-shards", SM90, BF16, "row-wise"),
    ("static-one-shard", SM90, FP16, ((), (1,))),
    ("prequantized-shard-scales", SM89, BF16, "row-wise"),
    ("dynamic", SM90, BF16, "row-wise"),  # one token: a [1, 1] row-wise scale
    ("static-shards", SM90, FP16, None),  # the Triton GEMM (interpreted here)
    ("static-shards", SM80, BF16, None),  # the weight decoded at load
    ("dynamic", SM80, FP16, None),
    ("dynamic", SM80, FP32, None),
])
def test_picked_kernel_matches_the_reference(monkeypatch, m, layer, capability, dtype, scale_shapes) -> None:
    """The arguments handed to torch._scaled_mm go through its CPU build, which checks scale shapes as its CUDA
    build does (per tensor: one element each; row-wise: [M, 1] and [1, N], contiguous)."""
    linear = LAYERS[layer](dtype)
    x = (torch.randn(m, 64, generator=torch.Generator().manual_seed(m)) * 3).to(dtype)
    expected = linear(x)
    assert _picked(linear) == "cpu_fp8_matmul"  # a layer on its own picks at its first call: on a CPU
    _select_on_gpu(linear, capability)
    calls = []
    scaled_mm = torch._scaled_mm

    def spy(a, b, *, scale_a, scale_b, **kwargs):
        calls.append((tuple(scale_a.shape), tuple(scale_b.shape)))
        return scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    out = linear(x)
    if scale_shapes is None:
        assert calls == []
    else:
        assert calls == [((m, 1), (1, 80)) if scale_shapes == "row-wise" else scale_shapes]
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.float() - expected.float()).abs().max().item()
    assert err <= TOLERANCE[dtype] * expected.float().abs().max().item(), err


def test_static_layer_without_input_scale_refuses_to_run() -> None:
    layer, _, _ = _linear(Fp8StaticMethod())
    with pytest.raises(RuntimeError, match="input scale"):
        layer(torch.randn(2, 64))


def test_quant_config_api() -> None:
    qc = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.INT8)
    assert (qc.quantization, qc.kv_cache_quant) == ("fp8", "int8")
    assert QuantConfig(quant_algo=QuantAlgo.W4A16_MXFP4).quantization == "mxfp4"
    assert QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN").quantization == "fp8-dynamic"
    assert QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8).quantization is None  # KV cache only
    assert QuantConfig(kv_cache_quant_algo=QuantAlgo.INT4).kv_cache_quant == "int4"
    assert QuantConfig(kv_cache_quant_algo="INT4").kv_cache_quant == "int4"
    with pytest.raises(ValueError, match="kv_cache_quant_algo"):
        QuantConfig(kv_cache_quant_algo=QuantAlgo.MXFP4)
    with pytest.raises(ValueError, match="quant_algo"):
        QuantConfig(quant_algo=QuantAlgo.INT4)  # KV cache only
    with pytest.raises(ValueError, match="quant_algo"):
        QuantConfig(quant_algo="int3")
    with pytest.raises(ValueError, match="calib_batches"):
        CalibConfig(calib_batches=0)


def test_user_errors(tmp_path, calib_file) -> None:
    with pytest.raises(ValueError, match="needs calibration data"):
        LLM(str(BUNDLED_MODEL), quant_config=QuantConfig(quant_algo=QuantAlgo.FP8))
    with pytest.raises(ValueError, match="Unknown quantization"):
        LLM(str(BUNDLED_MODEL), quantization="fp4-magic")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x = 1")
    for bad in ("empty.txt", "short.txt"):
        with pytest.raises(ValueError, match="empty or shorter than one batch"):
            LLM(str(BUNDLED_MODEL), quantization="fp8", max_model_len=256,
                calib_config=CalibConfig(calib_dataset=str(tmp_path / bad), calib_batch_size=4))
    with pytest.raises(ValueError, match="Cannot read the calibration data"):
        LLM(str(BUNDLED_MODEL), quantization="fp8", calib_config=CalibConfig(calib_dataset=str(tmp_path / "no")))


def test_calibration_is_reproducible_and_jsonl_works(tmp_path, calib_file) -> None:
    lines = [json.dumps({"text": TEXT[i : i + 3000]}) for i in range(0, 60_000, 3000)]
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n")
    scales = []
    for path in (calib_file, calib_file, tmp_path / "calib.jsonl"):
        llm = LLM(str(BUNDLED_MODEL), dtype="float32", quantization="fp8", max_model_len=256, calib_config=calib(path))
        scales.append(llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.input_scale.clone())
    assert torch.equal(scales[0], scales[1]) and not torch.isnan(scales[2]).any()


@pytest.mark.parametrize("scheme", ["fp8", "fp8-dynamic"])
def test_checkpoint_reloads_without_recalibrating(scheme, tmp_path, calib_file) -> None:
    from microscale.export import quantize_checkpoint

    kwargs = {"calib_config": calib(calib_file)} if scheme == "fp8" else {}
    llm = LLM(str(BUNDLED_MODEL), dtype="float32", quantization=scheme, max_model_len=256, **kwargs)
    out = quantize_checkpoint(BUNDLED_MODEL, tmp_path / scheme, scheme, llm.engine)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    scale = tensors["model.layers.0.mlp.down_proj.weight_scale"]
    assert scale.shape == ((1,) if scheme == "fp8" else (scale.shape[0], 1))
    assert ("model.layers.0.mlp.up_proj.input_scale" in tensors) == (scheme == "fp8")
    reloaded = LLM(str(out), dtype="float32", max_model_len=256)
    assert reloaded.engine.quant.linear == scheme and reloaded.engine.quant.prequantized
    ids = list(range(10, 60))
    assert torch.equal(reloaded.engine.prompt_logits(ids), llm.engine.prompt_logits(ids))


def test_checkpoint_from_another_tool_and_missing_scales(tmp_path, calib_file) -> None:
    """Scales stored as 0-d tensors (as some tools write them); then a scale deleted."""
    from microscale.export import quantize_checkpoint

    llm = LLM(str(BUNDLED_MODEL), dtype="float32", quantization="fp8", max_model_len=256,
              calib_config=calib(calib_file))
    out = quantize_checkpoint(BUNDLED_MODEL, tmp_path / "ours", "fp8", llm.engine)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    tensors = {k: (v.reshape(()) if k.endswith("_scale") else v)
               for k, v in load_file(str(out / "model.safetensors")).items()}
    save_file(tensors, str(other / "model.safetensors"))
    ids = list(range(10, 60))
    assert torch.equal(LLM(str(other), dtype="float32").engine.prompt_logits(ids), llm.engine.prompt_logits(ids))
    del tensors["model.layers.1.self_attn.k_proj.input_scale"]
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks input_scale"):
        LLM(str(other), dtype="float32")
