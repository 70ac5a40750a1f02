"""`microscale quantize`: write a pre-quantized checkpoint that microscale and transformers both load.

MXFP4 follows gpt-oss's own checkpoints: the MoE experts become `*_blocks` (uint8, two FP4 values per byte)
and `*_scales` (E8M0), out-features major; attention, router, norms, embeddings and biases keep their
16/32-bit tensors, and config.json gets `quantization_config: {quant_method: mxfp4, ...}`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from microscale.models.loader import load_model_config
from microscale.models.weights import iterate_safetensors
from microscale.quant.mxfp4 import pack_mxfp4

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("mxfp4",)
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")
# gpt-oss's MXFP4 checkpoints leave these in 16 bits (config.json's modules_to_not_convert).
_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_EXPERT_PROJECTIONS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
_SHARD_BYTES = 2 << 30


def _mxfp4_tensors(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if not name.endswith(_EXPERT_PROJECTIONS):
        yield name, tensor
        return
    # [experts, in, out] -> out-features major, quantised one expert at a time.
    packed = [pack_mxfp4(expert.t()) for expert in tensor]
    yield f"{name}_blocks", torch.stack([blocks for blocks, _ in packed])
    yield f"{name}_scales", torch.stack([scales for _, scales in packed])


def quantize_checkpoint(model_dir: Path, out_dir: Path, quant: str = "mxfp4") -> Path:
    """Write the MXFP4 checkpoint of the 16/32-bit gpt-oss model in `model_dir` to `out_dir`."""
    if quant not in EXPORT_FORMATS:
        raise ValueError(f"Cannot write {quant!r} checkpoints; supported: {', '.join(EXPORT_FORMATS)}.")
    cfg = load_model_config(model_dir)
    if cfg.checkpoint_quant is not None:
        raise ValueError(f"{model_dir} is already quantized ({cfg.checkpoint_quant}).")
    if cfg.num_experts == 0:
        raise ValueError(
            "MXFP4 checkpoints hold MoE experts (the gpt-oss layout); quantize a dense model at load time "
            "instead, with --quant mxfp4."
        )
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors")):
        raise ValueError(f"{out_dir} already holds a checkpoint; choose an empty or new folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir)
    for name, tensor in iterate_safetensors(model_dir):
        for out_name, out_tensor in _mxfp4_tensors(name, tensor):
            writer.add(out_name, out_tensor)
    writer.finish()
    hf_config = dict(cfg.hf_config)
    hf_config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": _NOT_CONVERTED}
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name in _COPIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    logger.info("wrote the %s checkpoint of %s to %s", quant, model_dir, out_dir)
    return out_dir


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
