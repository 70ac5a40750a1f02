"""The FP8 weight formats, "fp8" (static activation scales) and "fp8-dynamic", and their checkpoints in
compressed-tensors naming (what vLLM loads): each quantized Linear's `weight` in float8_e4m3fn with
`weight_scale` (per tensor [1], or per channel [out, 1]) and, for static activations, `input_scale` [1]; an FP8
KV cache adds `self_attn.k_scale` / `v_scale`. Written checkpoints carry the scales the calibrated engine
serves with. MoE experts stay in the model dtype."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from microscale.quant.format import (
    CheckpointExport,
    CheckpointQuant,
    TensorTransform,
    WeightFormat,
    register_weight_format,
)
from microscale.quant.fp8 import FP8_DTYPE, Fp8DynamicMethod, Fp8StaticMethod

if TYPE_CHECKING:
    from microscale.config import ModelConfig
    from microscale.quant.kv_cache import KVCache

_FLOAT8 = {"num_bits": 8, "type": "float", "symmetric": True}
_KV_CACHE = "fp8"  # the KV cache format whose scales compressed-tensors' kv_cache_scheme describes


class _CompressedTensorsFp8(WeightFormat):
    checkpoint_method = "compressed-tensors"
    exportable = True
    exports_served_weights = True
    # The config group's strategies: weights per "tensor" / "channel"; input activations per "tensor" / "token".
    weight_strategy: ClassVar[str]
    input_strategy: ClassVar[str]
    dynamic_inputs: ClassVar[bool]

    def read_checkpoint(self, quantization_config: dict[str, Any]) -> CheckpointQuant | None:
        groups = list((quantization_config.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError("compressed-tensors checkpoints with other than one config group are not supported.")
        weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
        fp8 = all(part.get("type") == "float" and part.get("num_bits") == 8 for part in (weights, inputs))
        ours = (weights.get("strategy"), inputs.get("strategy"), bool(inputs.get("dynamic"))) == (
            self.weight_strategy, self.input_strategy, self.dynamic_inputs)
        if not (fp8 and ours):
            return None
        kv = quantization_config.get("kv_cache_scheme")
        if kv and not (kv.get("type") == "float" and kv.get("num_bits") == 8):
            raise ValueError(f"Unsupported kv_cache_scheme in the checkpoint: {kv}.")
        return CheckpointQuant(linear=self.name, kv_cache=_KV_CACHE if kv else None)

    def export(self, cfg: ModelConfig, model: nn.Module | None, kv_caches: list[KVCache]) -> CheckpointExport:
        extra = _kv_scale_tensors(kv_caches)
        config = {
            "quant_method": self.checkpoint_method,
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {**_FLOAT8, "strategy": self.weight_strategy, "dynamic": False},
                "input_activations": {**_FLOAT8, "strategy": self.input_strategy, "dynamic": self.dynamic_inputs},
            }},
            "ignore": ["lm_head"],
        }
        if extra:
            config["kv_cache_scheme"] = {**_FLOAT8, "strategy": "tensor", "dynamic": False}
        return CheckpointExport(self._served_tensors(model), config, extra)

    def _served_tensors(self, model: nn.Module) -> TensorTransform:
        """Each checkpoint Linear weight -> the served FP8 rows of its (possibly fused) layer, with their scales."""
        modules = dict(model.named_modules())

        def transform(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
            ours, _, shard = model.map_checkpoint_tensor(name, tensor)
            module_name, _, leaf = ours.rpartition(".")
            layer = modules.get(module_name)
            if leaf != "weight" or getattr(layer, "weight", None) is None or layer.weight.dtype != FP8_DTYPE:
                yield name, tensor
                return
            prefix = name.removesuffix(".weight")
            index = 0 if shard is None else shard
            offset, rows = sum(layer.output_sizes[:index]), layer.output_sizes[index]
            yield name, layer.weight[offset : offset + rows].cpu()
            yield from self._scale_tensors(layer, prefix, index, offset, rows)

        return transform

    def _scale_tensors(self, layer: nn.Module, prefix: str, index: int, offset: int,
                       rows: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The scales of shard `index` (rows offset..offset + rows of the fused layer)."""
        raise NotImplementedError


def _kv_scale_tensors(kv_caches: list[KVCache]) -> dict[str, torch.Tensor]:
    """Static KV cache scales, as compressed-tensors names them (empty unless the KV cache has such scales)."""
    tensors = {}
    for layer, cache in enumerate(kv_caches):
        if cache.checkpoint_scales:
            for half, name in enumerate(("k_scale", "v_scale")):
                tensors[f"model.layers.{layer}.self_attn.{name}"] = cache.static_scales[half].reshape(1).cpu()
    return tensors


@register_weight_format
class Fp8StaticFormat(_CompressedTensorsFp8):
    name = "fp8"
    linear_method_class = Fp8StaticMethod
    checkpoint_description = "FP8 with per-tensor weights and static per-tensor activations"
    needs_calibration = True
    calibrated_parameters = (".input_scale",)
    weight_strategy, input_strategy, dynamic_inputs = "tensor", "tensor", False

    def _scale_tensors(self, layer, prefix, index, offset, rows) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{prefix}.weight_scale", layer.weight_scale[index].reshape(1).cpu()
        # A copy per shard: safetensors refuses tensors that share storage.
        yield f"{prefix}.input_scale", layer.activation_scale.reshape(1).clone().cpu()


@register_weight_format
class Fp8DynamicFormat(_CompressedTensorsFp8):
    name = "fp8-dynamic"
    linear_method_class = Fp8DynamicMethod
    checkpoint_description = "FP8 with per-channel weights and dynamic per-token activations"
    weight_strategy, input_strategy, dynamic_inputs = "channel", "token", True

    def _scale_tensors(self, layer, prefix, index, offset, rows) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{prefix}.weight_scale", layer.weight_scale[offset : offset + rows].reshape(-1, 1).cpu()
