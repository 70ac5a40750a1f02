"""FP8 (E4M3) Linear methods.

"fp8": per-tensor weight scales (one per fused shard, e.g. q, k and v, as checkpoints store them) and a static
per-tensor activation scale from calibration (W8A8-static). "fp8-dynamic": per-output-channel weight scales
and per-token activation scales computed on the fly.

Quantising is `(x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`: torch's own rounding (nearest even),
saturating instead of producing NaN. The matmul is `torch._scaled_mm` on GPUs with FP8 units (sm89+);
elsewhere the FP8 operands are converted exactly to the activation dtype and multiplied there, then scaled,
which is what _scaled_mm computes (products of FP8 values accumulated in higher precision, times the scales).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from microscale.distributed.parallel_state import all_reduce_max
from microscale.kernels.candidates import Candidate, always, pick_kernel
from microscale.kernels.selector import triton_unavailable_reason
from microscale.quant.base import QuantMethod, register_quant_method
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


@functools.cache
def _scaled_mm_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"needs compute capability 8.9+ (this GPU is {capability[0]}.{capability[1]})"
    return None


def fp8_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """(x_q * x_scale) @ (w_q * w_scale)^T + bias. x_scale: [] or [tokens, 1]; w_scale: [] or [out].
    torch._scaled_mm where it can run, else the reference."""
    if _scaled_mm_unavailable_reason(x_q.device) is None and x_q.shape[1] % 16 == 0 and w_q.shape[0] % 16 == 0:
        scale_a = x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(())
        scale_b = w_scale.reshape(1, -1) if w_scale.numel() > 1 else w_scale.reshape(())
        if scale_a.dim() == scale_b.dim():  # _scaled_mm takes both per-tensor or both row/column-wise
            return torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)
    return fp8_matmul_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def fp8_matmul_reference(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    """The oracle: exact FP8 -> out_dtype conversions, one matmul, then the scales. float16 outputs are
    accumulated in float32: one product of raw E4M3 values reaches 448² = 200704, past float16's range."""
    compute = torch.float32 if out_dtype == torch.float16 else out_dtype
    y = F.linear(x_q.to(compute), dequantize_fp8_weight(w_q, compute))
    y = (y.float() * (x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale) * w_scale).to(out_dtype)
    return y if bias is None else y + bias


def _triton_unavailable_reason(device: torch.device) -> str | None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return reason
    from microscale.kernels.fp8_gemm import fp8_gemm_unavailable_reason

    return fp8_gemm_unavailable_reason(device)


def _triton_matmul(*args) -> torch.Tensor:
    from microscale.kernels.fp8_gemm import fp8_gemm

    return fp8_gemm(*args)


# In order of preference where the fast family is allowed; the reference alone otherwise.
_SCALED_MM = Candidate("torch._scaled_mm (cuBLAS FP8)", _scaled_mm_unavailable_reason, fp8_matmul)
_TRITON = Candidate("triton FP8 GEMM", _triton_unavailable_reason, _triton_matmul)
_REFERENCE = Candidate("torch reference (dequantise, then matmul)", always, fp8_matmul_reference)


class _Fp8Method(QuantMethod):
    """Shared storage: `weight` float8_e4m3fn [out, in] and `bias` in the model dtype; subclasses add their
    scales. A floating checkpoint weight is quantised as it loads (one shard at a time); an FP8 one (a
    pre-quantized checkpoint) is copied with its scale."""

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

    def loads_slices(self, name: str, checkpoint_dtype: str) -> bool:
        # A 16/32-bit weight is quantised here with a scale over its whole tensor (or rows): read it whole.
        return not (name == "weight" and checkpoint_dtype != "F8_E4M3")

    def select_kernel(self, layer, family, device) -> None:
        candidates = [_SCALED_MM, _TRITON, _REFERENCE] if family == "triton" else [_REFERENCE]
        layer.fp8_matmul = pick_kernel("FP8 linear", candidates, device).fn

    def process_weights_after_loading(self, layer) -> None:
        if torch.isnan(layer.weight_scale).any():
            raise ValueError("An FP8 checkpoint lacks weight_scale for some Linear layer (or one of its shards).")


@register_quant_method("fp8")
class Fp8StaticMethod(_Fp8Method):
    """Per-tensor weight scales, one per shard ([num_shards]), and a static activation scale. Checkpoints give
    `input_scale` per shard (all shards see the same input: their maximum is used); online quantization gets it
    from calibration: while `layer.calibrating`, the layer runs W8A16 (the FP8 weights that will serve, 16-bit
    activations) and records the largest |input| in `layer.input_amax`; `set_input_scale` then fixes it."""

    def create_scales(self, layer, output_sizes, weight_loader) -> None:
        shards = len(output_sizes)
        layer.register_parameter("weight_scale", _unset((shards,)))
        layer.register_parameter("input_scale", _unset((shards,)))
        # Row i of the weight uses the scale of its shard.
        layer.register_buffer("row_scale", torch.ones(sum(output_sizes)), persistent=False)
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
        sizes = torch.tensor(layer.output_sizes, device=layer.weight_scale.device)
        layer.row_scale.copy_(torch.repeat_interleave(layer.weight_scale.data, sizes))
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

    def static_fp8_input_scale(self, layer) -> torch.Tensor | None:
        return layer.activation_scale if layer.has_input_scale and not layer.calibrating else None

    def apply_fp8_input(self, layer, x_q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x_q: the input already quantised with static_fp8_input_scale (e.g. by a fused activation)."""
        flat = x_q.reshape(-1, x_q.shape[-1])
        scale = layer.activation_scale
        y = _matmul(layer)(flat, scale, layer.weight, layer.row_scale, layer.bias, out_dtype)
        return y.view(*x_q.shape[:-1], -1)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.calibrating:
            torch.maximum(layer.input_amax, x.detach().abs().amax().float(), out=layer.input_amax)
            weight = (dequantize_fp8_weight(layer.weight, torch.float32) * layer.row_scale[:, None]).to(x.dtype)
            return F.linear(x, weight, layer.bias)
        if not layer.has_input_scale:
            raise RuntimeError("FP8 static activations need an input scale: calibrate, or load a checkpoint with one.")
        return self.apply_fp8_input(layer, quantize_fp8(x, layer.activation_scale), x.dtype)


@register_quant_method("fp8-dynamic")
class Fp8DynamicMethod(_Fp8Method):
    """Per-output-channel weight scales ([out]) and per-token activation scales computed for every call."""

    def create_scales(self, layer, output_sizes, weight_loader) -> None:
        layer.register_parameter("weight_scale", _unset((sum(output_sizes),)))
        layer.weight_scale.weight_loader = weight_loader

    def quantize_weight(self, weight):
        scale = fp8_scale(weight.abs().amax(dim=1))
        return quantize_fp8(weight, scale[:, None]), scale

    def store_weight_scale(self, layer, scale, shard) -> None:
        layer.weight_scale.weight_loader(layer.weight_scale, scale.reshape(-1), shard)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        amax = flat.abs().amax(dim=1, keepdim=True)
        if getattr(layer, "parallel", None) == "row":  # a rank sees a slice of each token: scale by the whole
            all_reduce_max(amax)
        scale = fp8_scale(amax)
        y = _matmul(layer)(quantize_fp8(flat, scale), scale, layer.weight, layer.weight_scale, layer.bias, x.dtype)
        return y.view(*x.shape[:-1], -1)


def _matmul(layer):
    """The kernel the runner picked, or (a layer used on its own) torch._scaled_mm where it runs."""
    return getattr(layer, "fp8_matmul", fp8_matmul)
