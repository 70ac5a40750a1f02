"""`microscale quantize`: write a pre-quantized checkpoint that microscale reloads as it is (and other
tools too), streaming the source checkpoint one tensor at a time. What each format's tensors and config are
called is its format class's (`export`, microscale/quant/); this is the workflow around it (checks, the engine
that holds the served weights and scales, safetensors shards, the files copied beside them, the accuracy report).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from microscale.models.loader import load_model_config
from microscale.models.weights import iterate_safetensors
from microscale.quant.format import exportable_weight_formats, weight_format

if TYPE_CHECKING:
    from microscale.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "chat_template.jinja")
_SHARD_BYTES = 2 << 30


def quantize_checkpoint(model_dir: Path, out_dir: Path, quant: str = "mxfp4", engine: LLMEngine | None = None) -> Path:
    """Write the `quant` checkpoint of the 16/32-bit model in `model_dir` to `out_dir`. Formats that export
    served weights (fp8, fp8-dynamic) take the `engine` that serves `model_dir` in that format (calibrated, for
    static scales)."""
    if quant not in exportable_weight_formats():
        raise ValueError(f"Cannot write {quant!r} checkpoints; supported: {', '.join(exportable_weight_formats())}.")
    fmt = weight_format(quant)
    cfg = load_model_config(model_dir)
    if cfg.checkpoint_quant is not None:
        raise ValueError(f"{model_dir} is already quantized ({cfg.checkpoint_quant}).")
    if out_dir.is_dir() and any(out_dir.glob("*.safetensors")):
        raise ValueError(f"{out_dir} already holds a checkpoint; choose an empty or new folder.")
    if not fmt.exports_served_weights:
        export = fmt.export(cfg, None, [])
    elif engine is None or engine.quant.linear != quant:
        raise ValueError(f"Writing {quant} needs an engine that serves the model with quantization={quant}.")
    else:
        export = fmt.export(cfg, engine.runner.model, engine.runner.kv_caches)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir)
    for name, tensor in iterate_safetensors(model_dir):
        for out_name, out_tensor in export.transform(name, tensor):
            writer.add(out_name, out_tensor)
    for out_name, out_tensor in export.extra.items():
        writer.add(out_name, out_tensor)
    writer.finish()
    hf_config = dict(cfg.hf_config)
    hf_config["quantization_config"] = export.quantization_config
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
