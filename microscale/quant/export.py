"""`microscale quantize`: write a pre-quantized checkpoint that microscale reloads as it is (and other
tools too), streaming the source checkpoint one tensor at a time.

- mxfp4 follows gpt-oss's own checkpoints: the MoE experts become `*_blocks` (uint8, two FP4 values per byte)
  and `*_scales` (E8M0), out-features major; attention, router, norms, embeddings and biases keep their
  16/32-bit tensors; config.json gets `quantization_config: {quant_method: mxfp4, ...}`. transformers loads it.
- fp8 / fp8-dynamic follow compressed-tensors (the naming vLLM loads): each quantized Linear's `weight` in
  float8_e4m3fn with `weight_scale` (per tensor [1], or per channel [out, 1]) and, for static activations,
  `input_scale` [1]; an FP8 KV cache adds `self_attn.k_scale` / `v_scale`. The scales are the ones the
  calibrated engine serves with.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from microscale.models.loader import load_model_config
from microscale.models.weights import iterate_safetensors
from microscale.quant.kv_cache import Fp8KVCache
from microscale.quant.mxfp4 import pack_mxfp4

if TYPE_CHECKING:
    from microscale.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("mxfp4", "fp8", "fp8-dynamic")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")
# gpt-oss's MXFP4 checkpoints leave these in 16 bits (config.json's modules_to_not_convert).
_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_EXPERT_PROJECTIONS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
_SHARD_BYTES = 2 << 30

TensorTransform = Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]


def _mxfp4_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if not name.endswith(_EXPERT_PROJECTIONS):
        yield name, tensor
        return
    # [experts, in, out] -> out-features major, quantised one expert at a time.
    packed = [pack_mxfp4(expert.t()) for expert in tensor]
    yield f"{name}_blocks", torch.stack([blocks for blocks, _ in packed])
    yield f"{name}_scales", torch.stack([scales for _, scales in packed])


def _fp8_tensors(engine: LLMEngine) -> TensorTransform:
    """Each checkpoint Linear weight -> the served FP8 rows of its (possibly fused) layer, with their scales."""
    model = engine.runner.model
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
        if engine.quant.linear == "fp8":
            yield f"{prefix}.weight_scale", layer.weight_scale[index].reshape(1).cpu()
            # A copy per shard: safetensors refuses tensors that share storage.
            yield f"{prefix}.input_scale", layer.activation_scale.reshape(1).clone().cpu()
        else:
            yield f"{prefix}.weight_scale", layer.weight_scale[offset : offset + rows].reshape(-1, 1).cpu()

    return transform


def _compressed_tensors_config(linear: str, fp8_kv_cache: bool) -> dict:
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


def quantize_checkpoint(model_dir: Path, out_dir: Path, quant: str = "mxfp4", engine: LLMEngine | None = None) -> Path:
    """Write the `quant` checkpoint of the 16/32-bit model in `model_dir` to `out_dir`. fp8 formats take the
    `engine` that serves `model_dir` with that quantization (calibrated, for static scales)."""
    if quant not in EXPORT_FORMATS:
        raise ValueError(f"Cannot write {quant!r} checkpoints; supported: {', '.join(EXPORT_FORMATS)}.")
    cfg = load_model_config(model_dir)
    if cfg.checkpoint_quant is not None:
        raise ValueError(f"{model_dir} is already quantized ({cfg.checkpoint_quant}).")
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors")):
        raise ValueError(f"{out_dir} already holds a checkpoint; choose an empty or new folder.")
    if quant == "mxfp4":
        if cfg.num_experts == 0:
            raise ValueError(
                "MXFP4 checkpoints hold MoE experts (the gpt-oss layout); quantize a dense model at load time "
                "instead, with --quant mxfp4."
            )
        transform: TensorTransform = _mxfp4_tensors
        quant_config = {"quant_method": "mxfp4", "modules_to_not_convert": _NOT_CONVERTED}
        extra: dict[str, torch.Tensor] = {}
    else:
        if engine is None or engine.quant.linear != quant:
            raise ValueError(f"Writing {quant} needs an engine that serves the model with quantization={quant}.")
        transform = _fp8_tensors(engine)
        extra = _kv_scale_tensors(engine)
        quant_config = _compressed_tensors_config(quant, fp8_kv_cache=bool(extra))
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir)
    for name, tensor in iterate_safetensors(model_dir):
        for out_name, out_tensor in transform(name, tensor):
            writer.add(out_name, out_tensor)
    for out_name, out_tensor in extra.items():
        writer.add(out_name, out_tensor)
    writer.finish()
    hf_config = dict(cfg.hf_config)
    hf_config["quantization_config"] = quant_config
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name in _COPIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    logger.info("wrote the %s checkpoint of %s to %s", quant, model_dir, out_dir)
    return out_dir


def _kv_scale_tensors(engine: LLMEngine) -> dict[str, torch.Tensor]:
    """Static FP8 KV cache scales, as compressed-tensors names them (empty unless the KV cache is FP8)."""
    tensors = {}
    for layer, cache in enumerate(engine.runner.kv_caches):
        if isinstance(cache, Fp8KVCache):
            for half, name in enumerate(("k_scale", "v_scale")):
                tensors[f"model.layers.{layer}.self_attn.{name}"] = cache.static_scales[half].reshape(1).cpu()
    return tensors


class _ShardWriter:
    """Safetensors shards of at most ~2 GiB, written as they fill (a large model never sits in memory whole),
    named model-0000i-of-0000n.safetensors with an index once the count is known."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > _SHARD_BYTES:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.weight_map[name] = len(self.files)
        self.size += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.files)}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(path)
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        self._flush()
        if len(self.files) == 1:
            self.files[0].rename(self.out_dir / "model.safetensors")
            return
        names = [f"model-{i:05d}-of-{len(self.files):05d}.safetensors" for i in range(1, len(self.files) + 1)]
        for path, name in zip(self.files, names):
            path.rename(self.out_dir / name)
        index = {"metadata": {}, "weight_map": {k: names[i] for k, i in self.weight_map.items()}}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_accuracy_report(out_dir: Path, result, data: str, quant: str) -> None:
    """The measured accuracy travels with the checkpoint: accuracy.json and a README.md."""
    figures = {"quant": quant, "data": str(data), **result.to_dict()}
    (out_dir / "accuracy.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out_dir / "README.md").write_text(
        f"# {quant} checkpoint written by `microscale quantize`\n\n"
        f"Measured against the unquantized model on `{Path(data).name}` ({result.tokens} tokens):\n\n"
        "| perplexity (reference) | perplexity (quantized) | delta | mean KL | top-1 agreement |\n"
        "|---|---|---|---|---|\n"
        f"| {result.ppl_ref:.4f} | {result.ppl_quant:.4f} | {result.ppl_delta_pct:+.3f}% | {result.kl_mean:.6f} "
        f"| {result.top1_agreement:.4f} |\n"
    )
