"""How each exported format names its tensors and describes itself in config.json (the `microscale quantize`
workflow that writes them is microscale/export.py):

- mxfp4 follows gpt-oss's own checkpoints: the MoE experts become `*_blocks` (uint8, two FP4 values per byte)
  and `*_scales` (E8M0), out-features major; attention, router, norms, embeddings and biases keep their
  16/32-bit tensors; config.json gets `quantization_config: {quant_method: mxfp4, ...}`. transformers loads it.
- fp8 / fp8-dynamic follow compressed-tensors (the naming vLLM loads): each quantized Linear's `weight` in
  float8_e4m3fn with `weight_scale` (per tensor [1], or per channel [out, 1]) and, for static activations,
  `input_scale` [1]; an FP8 KV cache adds `self_attn.k_scale` / `v_scale`. The scales are the ones the
  calibrated engine serves with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from microscale.quant.kv_cache import Fp8KVCache, KVCache
from microscale.quant.mxfp4 import pack_mxfp4

EXPORT_FORMATS = ("mxfp4", "fp8", "fp8-dynamic")
# gpt-oss's MXFP4 checkpoints leave these in 16 bits (config.json's modules_to_not_convert).
_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
MXFP4_QUANT_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": _NOT_CONVERTED}
_EXPERT_PROJECTIONS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")

# One source checkpoint tensor (name, tensor) -> the tensors written in its place.
TensorTransform = Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]


def mxfp4_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if not name.endswith(_EXPERT_PROJECTIONS):
        yield name, tensor
        return
    # [experts, in, out] -> out-features major, quantised one expert at a time.
    packed = [pack_mxfp4(expert.t()) for expert in tensor]
    yield f"{name}_blocks", torch.stack([blocks for blocks, _ in packed])
    yield f"{name}_scales", torch.stack([scales for _, scales in packed])


def fp8_tensors(model: nn.Module, linear: str) -> TensorTransform:
    """Each checkpoint Linear weight -> the served FP8 rows of its (possibly fused) layer in `model` (served
    with quantization `linear`), with their scales."""
    modules = dict(model.named_modules())

    def transform(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        ours, _, shard = model.map_checkpoint_tensor(name, tensor)
        module_name, _, leaf = ours.rpartition(".")
        layer = modules.get(module_name)
        if leaf != "weight" or getattr(layer, "weight", None) is None or layer.weight.dtype != torch.float8_e4m3fn:
            yield name, tensor
            return
        prefix = name.removesuffix(".weight")
        index = 0 if shard is None else shard
        offset, rows = sum(layer.output_sizes[:index]), layer.output_sizes[index]
        yield name, layer.weight[offset : offset + rows].cpu()
        if linear == "fp8":
            yield f"{prefix}.weight_scale", layer.weight_scale[index].reshape(1).cpu()
            # A copy per shard: safetensors refuses tensors that share storage.
            yield f"{prefix}.input_scale", layer.activation_scale.reshape(1).clone().cpu()
        else:
            yield f"{prefix}.weight_scale", layer.weight_scale[offset : offset + rows].reshape(-1, 1).cpu()

    return transform


def compressed_tensors_config(linear: str, fp8_kv_cache: bool) -> dict:
    static = linear == "fp8"
    float8 = {"num_bits": 8, "type": "float", "symmetric": True}
    config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {**float8, "strategy": "tensor" if static else "channel", "dynamic": False},
            "input_activations": {**float8, "strategy": "tensor" if static else "token", "dynamic": not static},
        }},
        "ignore": ["lm_head"],
    }
    if fp8_kv_cache:
        config["kv_cache_scheme"] = {**float8, "strategy": "tensor", "dynamic": False}
    return config


def kv_scale_tensors(kv_caches: list[KVCache]) -> dict[str, torch.Tensor]:
    """Static FP8 KV cache scales (one cache per layer, in layer order), as compressed-tensors names them
    (empty unless the KV cache is FP8)."""
    tensors = {}
    for layer, cache in enumerate(kv_caches):
        if isinstance(cache, Fp8KVCache):
            for half, name in enumerate(("k_scale", "v_scale")):
                tensors[f"model.layers.{layer}.self_attn.{name}"] = cache.static_scales[half].reshape(1).cpu()
    return tensors
