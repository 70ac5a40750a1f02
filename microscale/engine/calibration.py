"""Calibration: run sample text through the model and turn what it sees into static scales. It takes the model
(to watch) and a scoring callable (to run text through it: the engine passes its prompt scoring), so it knows
nothing of the engine that serves the model.

FP8 static activations: the largest |input| of each such Linear (while calibrating the layer runs with its
FP8 weights and 16-bit activations) becomes its input scale (amax / 448). KV cache: the largest |k| and |v|
per layer and KV head become the cache's static scales (INT8 and INT4 per head, FP8 per tensor).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from microscale.jsonl import json_lines
from microscale.layers.attention import Attention
from microscale.quant.config import CalibConfig
from microscale.quant.fp8 import Fp8StaticMethod, fp8_scale
from microscale.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Runs one token sequence through the model (its return value is not read).
Scorer = Callable[[list[int]], object]


def read_documents(path: str | Path) -> list[str]:
    """A text file is one document; a .jsonl file has one per line (a string, or an object with "text")."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"Cannot read the calibration data: {e}") from None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    docs = []
    for number, item in json_lines(raw, str(path)):
        text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise ValueError(f'{path}:{number}: expected a string or an object with a "text" string')
        docs.append(text)
    return docs


def calibration_windows(tokenizer: Tokenizer, calib: CalibConfig, max_len: int) -> list[list[int]]:
    """calib_batches x calib_batch_size token sequences, seeded: windows of calib_max_seq_length tokens at
    random offsets of the (truncated) documents."""
    if calib.calib_dataset is None:
        raise ValueError("CalibConfig.calib_dataset is not set: give a text or JSONL file to calibrate on.")
    length = min(calib.calib_max_seq_length, max_len)
    docs = read_documents(calib.calib_dataset)
    token_docs = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    if len(docs) > 1:  # several documents: each capped as the tokenizer would be
        token_docs = [ids[: calib.tokenizer_max_seq_length] for ids in token_docs]
    token_docs = [ids for ids in token_docs if len(ids) >= 2]
    total = sum(len(ids) for ids in token_docs)
    needed = calib.calib_batch_size * min(length, max((len(ids) for ids in token_docs), default=0))
    if not token_docs or total < needed or total < calib.calib_batch_size * 2:
        raise ValueError(
            f"The calibration data {calib.calib_dataset} is empty or shorter than one batch "
            f"({calib.calib_batch_size} x {length} tokens)."
        )
    rng = random.Random(calib.random_seed)
    windows = []
    for _ in range(calib.calib_batches * calib.calib_batch_size):
        ids = rng.choice(token_docs)
        start = rng.randrange(0, max(1, len(ids) - length + 1))
        windows.append(ids[start : start + length])
    return windows


@contextmanager
def _recording(model: nn.Module):
    """Static FP8 layers record their input amax; attention layers their K/V amax per KV head."""
    fp8_layers = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), Fp8StaticMethod)]
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    kv_amax = {layer.layer_index: [torch.zeros(layer.num_kv_heads), torch.zeros(layer.num_kv_heads)]
               for layer in attention}

    def record_kv(layer: Attention, args: tuple) -> None:
        _, k, v, _ = args
        for i, x in enumerate((k, v)):
            amax = x.detach().abs().amax(dim=(0, 2)).float().cpu()
            torch.maximum(kv_amax[layer.layer_index][i], amax, out=kv_amax[layer.layer_index][i])

    hooks = [layer.register_forward_pre_hook(record_kv) for layer in attention]
    for layer in fp8_layers:
        layer.calibrating = True
        layer.input_amax.zero_()
    try:
        yield fp8_layers, kv_amax
    finally:
        for hook in hooks:
            hook.remove()
        for layer in fp8_layers:
            layer.calibrating = False


def calibrate(
    model: nn.Module, score: Scorer, windows: list[list[int]]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Score every window while `model` records what it sees, then set its static FP8 input scales; returns
    the K/V amax per attention layer and KV head (the KV cache's scales come from them)."""
    with _recording(model) as (fp8_layers, kv_amax):
        for window in windows:
            score(window)
    for layer in fp8_layers:
        layer.quant_method.set_input_scale(layer, fp8_scale(layer.input_amax))
    logger.info("calibrated on %d sequences (%d tokens): %d FP8 input scales, K/V amax of %d layers",
                len(windows), sum(map(len, windows)), len(fp8_layers), len(kv_amax))
    return {layer: (k, v) for layer, (k, v) in kv_amax.items()}
