"""Find a model (local folder or Hugging Face hub id), build it and fill its weights."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from microscale.config import LOAD_FORMATS, ModelConfig
from microscale.distributed.parallel_state import tp_size
from microscale.models.registry import get_model_class
from microscale.models.weights import CheckpointReader, init_dummy_weights
from microscale.quant.scheme import QuantScheme

logger = logging.getLogger(__name__)

_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local folder as is; a hub id ("org/name") downloaded (or found in the HF cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if path.exists() or not _looks_like_hub_id(name):
        raise ValueError(f"Model path {name!r} is not a folder, and not a Hugging Face hub id (org/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, ...: one clear line for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"Model {name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"(offline or unknown repo?): {reason}"
        ) from None


def load_model_config(model_dir: Path) -> ModelConfig:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json; it is not a Hugging Face model folder.")
    try:
        return ModelConfig.from_file(config_file)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} is not a usable model config: {type(e).__name__}: {e}") from None


def load_generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


KVScales = dict[int, dict[str, torch.Tensor]]  # layer index -> {"k_scale": ..., "v_scale": ...}


def load_model(
    model_dir: Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    quant: QuantScheme,
    load_format: str = "auto",
    seed: int = 0,
) -> tuple[nn.Module, KVScales]:
    """The model with its weights, and the static KV cache scales a pre-quantized checkpoint carries."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"Unknown load_format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}.")
    cls = get_model_class(cfg.architecture)
    if quant != QuantScheme():
        logger.info("quantization: %s linear layers, %s MoE experts", quant.linear, quant.experts)
    with torch.device(device):
        model = cls(cfg, dtype, max_position, quant)
    kv_scales: KVScales = {}
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        # Tensor parallel: each rank reads only the slices it keeps where the model can take them alone.
        reader = CheckpointReader(model_dir, model.checkpoint_slice if tp_size() > 1 else None)
        loaded = model.load_weights(_split_kv_scales(iter(reader), kv_scales))
        if tp_size() > 1:
            logger.info("read %.2f of %.2f MiB of checkpoint (this rank's slices)", reader.bytes_read / 2**20,
                        reader.bytes_total / 2**20)
        expected = {name for name, _ in model.named_parameters()}
        missing = expected - loaded
        if cfg.tie_word_embeddings:
            missing.discard("lm_head.weight")
        missing = {name for name in missing if not quant.filled_by_calibration(name)}
        if missing:
            raise ValueError(f"Checkpoint in {model_dir} lacks weights: {', '.join(sorted(missing)[:5])}")
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(module)
    return model.eval(), kv_scales


def _split_kv_scales(
    tensors: Iterator[tuple[str, torch.Tensor]], kv_scales: KVScales
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass model tensors through; keep `model.layers.N.self_attn.{k,v}_scale` (compressed-tensors' static
    KV cache scales) aside for the KV cache."""
    for name, tensor in tensors:
        head, _, leaf = name.rpartition(".")
        if leaf in ("k_scale", "v_scale") and head.endswith(".self_attn"):
            layer = int(head.split(".")[-2])
            kv_scales.setdefault(layer, {})[leaf] = tensor.float()
        else:
            yield name, tensor
