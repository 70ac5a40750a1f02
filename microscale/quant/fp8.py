"""FP8 (E4M3) Linear methods.

"fp8": per-tensor weight scales (one per fused shard, e.g. q, k and v, as checkpoints store them) and a static
per-tensor activation scale from calibration (W8A8-static). "fp8-dynamic": per-output-channel weight scales
and per-token activation scales computed on the fly.

Quantising is `(x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`: torch's own rounding (nearest even),
saturating instead of producing NaN. Each layer picks its matmul once, at load, from what decides it: its scales
(one static activation scale or one per token; one weight scale or one per row), N and K, its dtype and bias,
and the GPU. On GPUs with FP8 units (sm89+): `torch._scaled_mm` per tensor, or row-wise with bfloat16 outputs;
the Triton FP8 GEMM for every other case. On older GPUs the weight is decoded once, at load, and multiplied in
16 bits. The reference (the "torch" kernel family) converts the FP8 operands exactly, multiplies them and
then scales, which is what the others compute (products of FP8 values summed in float32, times the scales). On a
CPU that family first tries a C kernel that decodes the weight in registers as it reads it, for decode-sized
inputs (kernels/cpu_gemv.py): at those sizes the matmul is bound by reading the weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from microscale.distributed.parallel_state import all_reduce_max
from microscale.kernels.batch_invariant import linear
from microscale.kernels.candidates import Candidate, always, pick_kernel
from microscale.kernels.cpu_gemv import MAX_TOKENS, cpu_gemv_applies, cpu_gemv_unavailable_reason, fp8_gemv
from microscale.kernels.selector import fp8_capability_shortfall, resolve_kernel_backend, triton_unavailable_reason
from microscale.quant.base import QuantMethod
from microscale.quant.scratch import scratch_buffer

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_MIN_SCALE = 1e-12  # an all-zero tensor still gets a usable scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps `amax` onto the largest FP8 value."""
    return (amax.float() / FP8_MAX).clamp(min=_MIN_SCALE)


def _param(data: torch.Tensor, weight_loader) -> nn.Parameter:
    param = nn.Parameter(data, requires_grad=False)
    param.weight_loader = weight_loader
    return param


_PAIR_TABLES: dict[tuple, torch.Tensor] = {}
_DECODE_CHUNK = 1 << 20  # byte pairs per step: the int32 indices stay cache-sized


def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every pair of FP8 bytes (read as one int16) -> its two values in `dtype`, packed in one machine word."""
    key = (dtype, device)
    table = _PAIR_TABLES.get(key)
    if table is None:
        pairs = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.uint8).view(-1, 2)
        values = pairs.contiguous().view(FP8_DTYPE).to(dtype)  # exact: E4M3 fits bf16, fp16 and fp32
        word = {2: torch.int32, 4: torch.int64}[values.element_size()]
        table = _PAIR_TABLES[key] = values.view(word).view(-1).to(device)
    return table


def dequantize_fp8_weight(w_q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`w_q.to(dtype)` (exact), into a reused buffer, two bytes per table lookup: on a CPU, about 3x faster
    than torch's elementwise conversion. Valid until the next call for a weight of the same shape."""
    out = scratch_buffer("fp8-weight", tuple(w_q.shape), dtype, w_q.device)
    if w_q.device.type != "cpu" or w_q.shape[-1] % 2 or not w_q.is_contiguous():
        return out.copy_(w_q)
    table = _pair_table(dtype, w_q.device)
    pairs = w_q.view(torch.int16).view(-1)
    words = out.view(table.dtype).view(-1)
    idx = torch.empty(min(len(pairs), _DECODE_CHUNK), dtype=torch.int32)
    for start in range(0, len(pairs), _DECODE_CHUNK):
        chunk = idx[: min(_DECODE_CHUNK, len(pairs) - start)]
        chunk.copy_(pairs[start : start + len(chunk)]).bitwise_and_(0xFFFF)  # int16 -> unsigned table index
        torch.index_select(table, 0, chunk, out=words[start : start + len(chunk)])
    return out


def _unset(shape: tuple[int, ...]) -> nn.Parameter:
    """A scale parameter that is NaN until loaded, so a checkpoint that lacks it is caught."""
    return nn.Parameter(torch.full(shape, float("nan")), requires_grad=False)


@dataclass(frozen=True)
class Fp8Problem:
    """What decides which kernel can run a layer's FP8 matmul, all known once the layer is loaded. The number of
    tokens M is not part of it: every kernel takes any M (one token's per-token scale is a [1, 1] row-wise one)."""

    x_per_token: bool  # dynamic per-token activation scales [M, 1]; else one static scale []
    w_per_row: bool  # a weight scale per output row [N] (per channel, or shards of different scales); else [1]
    n: int
    k: int
    out_dtype: torch.dtype
    bias_dtype: torch.dtype | None

    def __str__(self) -> str:
        x = "per-token" if self.x_per_token else "per-tensor"
        w = "per-row" if self.w_per_row else "per-tensor"
        bias = "" if self.bias_dtype is None else ", bias"
        return f"{x} x, {w} w, N={self.n}, K={self.k}, {str(self.out_dtype).removeprefix('torch.')}{bias}"


def _scaled_mm_unavailable_reason(problem: Fp8Problem, rowwise: bool, device: torch.device) -> str | None:
    """torch._scaled_mm's own limits on CUDA (a CPU build accepts more, so they are checked here)."""
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    shortfall = fp8_capability_shortfall(device)
    if shortfall is not None:
        return f"needs FP8 tensor cores: {shortfall}"
    if not rowwise and (problem.x_per_token or problem.w_per_row):
        return "takes one activation scale and one weight scale"
    # Row-wise runs CUTLASS on sm89 (and sm90 with cuBLAS before 12.9), whose float16 and float32 outputs are
    # newer than some torch releases GPU hosts run: bfloat16 is what all of them write.
    if rowwise and problem.out_dtype != torch.bfloat16:
        return f"row-wise scales give bfloat16 outputs only, not {problem.out_dtype}"
    if problem.k % 16 or problem.n % 16:
        return f"needs K and N multiples of 16 (K={problem.k}, N={problem.n})"
    bias = problem.bias_dtype
    if bias is not None and (bias != problem.out_dtype or bias == torch.float32):
        return "takes a bias only in the output dtype, and none with float32 outputs"
    return None


def scaled_mm_per_tensor(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """x_scale [] and w_scale [1]: cuBLAS's per-tensor FP8 GEMM."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype)


def scaled_mm_rowwise(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Row-wise _scaled_mm takes scale_a [M, 1] and scale_b [1, N], contiguous: a per-tensor scale on either side
    (a static activation scale with per-shard weight scales) is repeated per row; per-token scales, [1, 1] for
    one token included, pass as they are."""
    scale_a = x_scale.reshape(-1, 1).expand(x_q.shape[0], 1).contiguous()
    scale_b = w_scale.reshape(1, -1).expand(1, w_q.shape[0]).contiguous()
    return torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)


def fp8_matmul_reference(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The oracle: exact FP8 -> out_dtype conversions, one matmul, then the scales. float16 outputs are
    accumulated in float32: one product of raw E4M3 values reaches 448² = 200704, past float16's range."""
    compute = torch.float32 if out_dtype == torch.float16 else out_dtype
    y = linear(x_q.to(compute), dequantize_fp8_weight(w_q, compute))
    return _scaled(y, x_scale, w_scale, bias, out_dtype)


def _scaled(
    y: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The products of raw FP8 values `y` [M, N] times the activation and weight scales, plus the bias."""
    y = (y.float() * (x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale) * w_scale).to(out_dtype)
    return y if bias is None else y + bias


def cpu_fp8_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Where cpu_gemv_applies: the FP8 weight decoded in registers as it is read (kernels/cpu_gemv.py), with
    float32 sums; else (prefill, deterministic mode) the reference."""
    if not cpu_gemv_applies(x_q.shape[0]):
        return fp8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return _scaled(fp8_gemv(x_q.float().contiguous(), w_q), x_scale, w_scale, bias, out_dtype)


def _triton_unavailable_reason(device: torch.device) -> str | None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    from microscale.kernels.fp8_gemm import fp8_gemm_unavailable_reason

    return fp8_gemm_unavailable_reason(device)


def _triton_matmul(*args) -> torch.Tensor:
    from microscale.kernels.fp8_gemm import fp8_gemm

    return fp8_gemm(*args)


_DECODE_BLOCK = 1 << 24  # weights decoded per step at load: float32 temporaries of 64 MiB at most


def _decoded_weight(w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_q * w_scale in `dtype`, rounded once; a block of rows at a time, so the float32 products stay small."""
    out = torch.empty(w_q.shape, dtype=dtype, device=w_q.device)
    scale = w_scale.reshape(-1, 1).expand(w_q.shape[0], 1)
    rows = max(1, _DECODE_BLOCK // max(1, w_q.shape[1]))
    for start in range(0, w_q.shape[0], rows):
        out[start : start + rows] = w_q[start : start + rows].float() * scale[start : start + rows]
    return out


def _matmul_decoded(
    weight: torch.Tensor, x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """`weight`: w_q * w_scale decoded at load in the model dtype (w_q and w_scale are not read again). The
    activations are dequantised to that dtype too: in range for float16, where raw FP8 products are not."""
    x = (x_q.float() * x_scale).to(weight.dtype)
    return linear(x, weight, bias).to(out_dtype)


_TRITON = Candidate("triton FP8 GEMM", _triton_unavailable_reason, _triton_matmul)
# Where no FP8 kernel runs (GPUs before sm89): memory traded for not decoding the whole weight every call.
_DECODED = Candidate("torch F.linear on the weight decoded once at load (kept in the model dtype next to the FP8 "
                     "weight: 2 or 4 more bytes per weight)", always, _matmul_decoded)
_REFERENCE = Candidate("torch reference (dequantise, then matmul)", always, fp8_matmul_reference)


def _cpu_candidate(problem: Fp8Problem) -> Candidate:
    return Candidate(f"CPU FP8 products decoded in registers for up to {MAX_TOKENS} tokens (the reference above)",
                     lambda device: cpu_gemv_unavailable_reason(device, problem.k), cpu_fp8_matmul)


def _candidates(problem: Fp8Problem) -> list[Candidate]:
    """The "triton" family's, fastest first."""
    return [
        Candidate("torch._scaled_mm per-tensor (cuBLAS)",
                  functools.partial(_scaled_mm_unavailable_reason, problem, False), scaled_mm_per_tensor),
        Candidate("torch._scaled_mm row-wise",
                  functools.partial(_scaled_mm_unavailable_reason, problem, True), scaled_mm_rowwise),
        _TRITON,
        _DECODED,
    ]


class _Fp8Method(QuantMethod):
    """Shared storage: `weight` float8_e4m3fn [out, in] and `bias` in the model dtype; subclasses add their
    scales. A floating checkpoint weight is quantised as it loads (one shard at a time); an FP8 one (a
    pre-quantized checkpoint) is copied with its scale."""

    per_token_activations = False  # True: activation scales [tokens, 1], computed every call

    def create_weights(self, layer, input_size, output_sizes, bias, dtype, weight_loader) -> None:
        out = sum(output_sizes)
        try:
            weight = torch.empty(out, input_size, dtype=FP8_DTYPE)
        except (RuntimeError, TypeError) as e:  # a device or build without float8 storage
            raise ValueError(f"FP8 weights need float8_e4m3fn tensors, which this device cannot store: {e}") from e
        layer.register_parameter("weight", _param(weight, weight_loader))
        layer.register_parameter("bias", _param(torch.empty(out, dtype=dtype), weight_loader) if bias else None)
        self.create_scales(layer, output_sizes, weight_loader)

    def create_scales(self, layer, output_sizes, weight_loader) -> None:
        raise NotImplementedError

    def load_weight(self, layer, name, loaded, shard) -> list[str]:
        if name == "weight" and loaded.is_floating_point() and loaded.dtype != FP8_DTYPE:
            quantized, scale = self.quantize_weight(loaded.to(layer.weight.device))
            layer.weight.weight_loader(layer.weight, quantized, shard)
            self.store_weight_scale(layer, scale, shard)
            return ["weight", "weight_scale"]
        if name == "weight_scale":
            self.store_weight_scale(layer, loaded.float(), shard)
            return ["weight_scale"]
        return super().load_weight(layer, name, loaded, shard)

    def quantize_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def store_weight_scale(self, layer, scale: torch.Tensor, shard: int | None) -> None:
        raise NotImplementedError

    def matmul_weight_scale(self, layer) -> torch.Tensor:
        """The weight's scales as the matmul takes them: [1] (one for the whole weight) or [out] (one per row)."""
        raise NotImplementedError

    def loads_slices(self, name: str, checkpoint_dtype: str) -> bool:
        # A 16/32-bit weight is quantised here with a scale over its whole tensor (or rows): read it whole.
        return not (name == "weight" and checkpoint_dtype != "F8_E4M3")

    def select_kernel(self, layer, family, device) -> None:
        w_scale = self.matmul_weight_scale(layer)
        n, k = layer.weight.shape
        problem = Fp8Problem(x_per_token=self.per_token_activations, w_per_row=w_scale.numel() > 1, n=n, k=k,
                             out_dtype=layer.dtype, bias_dtype=None if layer.bias is None else layer.bias.dtype)
        candidates = _candidates(problem) if family == "triton" else [_cpu_candidate(problem), _REFERENCE]
        picked = pick_kernel(f"FP8 linear ({problem})", candidates, device)
        if picked is _DECODED:  # decoded now, before the KV cache is sized from the memory left
            layer.fp8_matmul = functools.partial(_matmul_decoded, _decoded_weight(layer.weight, w_scale, layer.dtype))
        else:
            layer.fp8_matmul = picked.fn

    def kernel(self, layer) -> Callable[..., torch.Tensor]:
        """The matmul picked for this layer: by the runner, or (a layer used on its own) at its first call."""
        if not hasattr(layer, "fp8_matmul"):
            device = layer.weight.device
            self.select_kernel(layer, resolve_kernel_backend("auto", device), device)
        return layer.fp8_matmul

    def process_weights_after_loading(self, layer) -> None:
        if torch.isnan(layer.weight_scale).any():
            raise ValueError("An FP8 checkpoint lacks weight_scale for some Linear layer (or one of its shards).")


class Fp8StaticMethod(_Fp8Method):
    """Per-tensor weight scales, one per shard ([num_shards]), and a static activation scale. Checkpoints give
    `input_scale` per shard (all shards see the same input: their maximum is used); online quantization gets it
    from calibration: while `layer.calibrating`, the layer runs W8A16 (the FP8 weights that will serve, 16-bit
    activations) and records the largest |input| in `layer.input_amax`; `set_input_scale` then fixes it."""

    def create_scales(self, layer, output_sizes, weight_loader) -> None:
        shards = len(output_sizes)
        layer.register_parameter("weight_scale", _unset((shards,)))
        layer.register_parameter("input_scale", _unset((shards,)))
        # The weight's scales as the matmul takes them (set once loaded): see process_weights_after_loading.
        layer.register_buffer("gemm_weight_scale", torch.ones(sum(output_sizes)), persistent=False)
        layer.register_buffer("input_amax", torch.zeros(()), persistent=False)
        # The one scale the input is quantized with (the shards' maximum), fixed once it is known, so the
        # forward neither reduces nor checks it (a check would sync the host every call).
        layer.register_buffer("activation_scale", torch.ones(()), persistent=False)
        layer.has_input_scale = False
        layer.calibrating = False

    def quantize_weight(self, weight):
        scale = fp8_scale(weight.abs().amax())
        return quantize_fp8(weight, scale), scale

    def store_weight_scale(self, layer, scale, shard) -> None:
        layer.weight_scale.data[0 if shard is None else shard] = scale.reshape(())

    def load_weight(self, layer, name, loaded, shard) -> list[str]:
        if name == "input_scale":
            layer.input_scale.data[0 if shard is None else shard] = loaded.float().reshape(())
            return ["input_scale"]
        return super().load_weight(layer, name, loaded, shard)

    def process_weights_after_loading(self, layer) -> None:
        super().process_weights_after_loading(layer)
        scales = layer.weight_scale.data
        if bool((scales == scales[0]).all()):  # one shard, or shards quantised alike: one scale, for _scaled_mm
            layer.gemm_weight_scale = scales[:1].clone()
        else:  # row i of the weight uses the scale of its shard
            sizes = torch.tensor(layer.output_sizes, device=scales.device)
            layer.gemm_weight_scale = torch.repeat_interleave(scales, sizes)
        if not torch.isnan(layer.input_scale).any():  # from the checkpoint (or dummy weights)
            self._fix_input_scale(layer)
        elif self.prequantized:
            raise ValueError("An FP8 checkpoint lacks input_scale for some Linear layer (or one of its shards).")

    def set_input_scale(self, layer, scale: torch.Tensor) -> None:
        layer.input_scale.data.fill_(scale.item())
        self._fix_input_scale(layer)

    def _fix_input_scale(self, layer) -> None:
        layer.activation_scale.copy_(layer.input_scale.max())
        layer.has_input_scale = True

    def matmul_weight_scale(self, layer) -> torch.Tensor:
        return layer.gemm_weight_scale

    def static_fp8_input_scale(self, layer) -> torch.Tensor | None:
        return layer.activation_scale if layer.has_input_scale and not layer.calibrating else None

    def apply_fp8_input(self, layer, x_q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x_q: the input already quantised with static_fp8_input_scale (e.g. by a fused activation)."""
        flat = x_q.reshape(-1, x_q.shape[-1])
        scale = layer.activation_scale
        y = self.kernel(layer)(flat, scale, layer.weight, layer.gemm_weight_scale, layer.bias, out_dtype)
        return y.view(*x_q.shape[:-1], -1)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.calibrating:
            torch.maximum(layer.input_amax, x.detach().abs().amax().float(), out=layer.input_amax)
            weight = (dequantize_fp8_weight(layer.weight, torch.float32) * layer.gemm_weight_scale[:, None]).to(x.dtype)
            return linear(x, weight, layer.bias)
        if not layer.has_input_scale:
            raise RuntimeError("FP8 static activations need an input scale: calibrate, or load a checkpoint with one.")
        return self.apply_fp8_input(layer, quantize_fp8(x, layer.activation_scale), x.dtype)


class Fp8DynamicMethod(_Fp8Method):
    """Per-output-channel weight scales ([out]) and per-token activation scales computed for every call."""

    per_token_activations = True

    def create_scales(self, layer, output_sizes, weight_loader) -> None:
        layer.register_parameter("weight_scale", _unset((sum(output_sizes),)))
        layer.weight_scale.weight_loader = weight_loader

    def quantize_weight(self, weight):
        scale = fp8_scale(weight.abs().amax(dim=1))
        return quantize_fp8(weight, scale[:, None]), scale

    def store_weight_scale(self, layer, scale, shard) -> None:
        layer.weight_scale.weight_loader(layer.weight_scale, scale.reshape(-1), shard)

    def matmul_weight_scale(self, layer) -> torch.Tensor:
        return layer.weight_scale

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        amax = flat.abs().amax(dim=1, keepdim=True)
        if getattr(layer, "parallel", None) == "row":  # a rank sees a slice of each token: scale by the whole
            all_reduce_max(amax)
        scale = fp8_scale(amax)
        y = self.kernel(layer)(quantize_fp8(flat, scale), scale, layer.weight, layer.weight_scale, layer.bias, x.dtype)
        return y.view(*x.shape[:-1], -1)
