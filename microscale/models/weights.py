"""Reading checkpoint tensors: single or sharded safetensors, memory-mapped, one tensor at a time."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from microscale.quant.base import copy_checked


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"No *.safetensors weights in {model_dir} (use load_format='dummy' for random weights).")
    return files


# (checkpoint name, shape, safetensors dtype) -> (dim, start, length) to read only that slice, or None (all).
SliceOf = Callable[[str, tuple[int, ...], str], "tuple[int, int, int] | None"]


class CheckpointReader:
    """Checkpoint tensors one at a time; with `slice_of` (tensor parallelism), only the part this rank keeps is
    read from disk where the model says it can take it alone. Counts the bytes read and the bytes there are."""

    def __init__(self, model_dir: Path, slice_of: SliceOf | None = None) -> None:
        self.files = safetensors_files(model_dir)
        self.slice_of = slice_of
        self.bytes_read = self.bytes_total = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    lazy = f.get_slice(name)
                    shape = tuple(lazy.get_shape())
                    part = self.slice_of(name, shape, lazy.get_dtype()) if self.slice_of else None
                    if part is None:
                        tensor = f.get_tensor(name)
                    else:
                        dim, start, length = part
                        tensor = lazy[(slice(None),) * dim + (slice(start, start + length),)]
                    self.bytes_read += tensor.numel() * tensor.element_size()
                    self.bytes_total += math.prod(shape) * tensor.element_size()
                    yield name, tensor


def iterate_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    yield from CheckpointReader(model_dir)


def load_named_tensors(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor, int | None]]) -> set[str]:
    """Fill `model` from (parameter name, tensor, fused shard) triples; returns the parameter names filled.

    A module with a `load_weight(name, tensor, shard)` method (Linear, FusedMoE) takes the tensors named
    after it, since its QuantMethod may store them differently (packed MXFP4 blocks and scales); any other
    parameter takes its tensor as is."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, tensor, shard in tensors:
        module_name, _, local = name.rpartition(".")
        module = modules.get(module_name)
        if hasattr(module, "load_weight"):
            loaded.update(f"{module_name}.{p}" for p in module.load_weight(local, tensor, shard))
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(f"Checkpoint tensor {name!r} matches no parameter of {type(model).__name__}.")
        copy_checked(param, tensor)
        loaded.add(name)
    return loaded


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes, with magnitudes that keep activations finite (norms stay 1). Drawn on
    each parameter's own device: a CPU generator fills an 8B model's weights in minutes, a GPU in a second."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        gen = generators.get(param.device)
        if gen is None:
            gen = generators[param.device] = torch.Generator(param.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("_scale"):  # FP8 weight / input scales
            param.fill_(1.0)
        elif param.dtype == torch.uint8:
            _init_dummy_packed(name, param, gen)
        elif param.dim() == 1:
            param.zero_()
        else:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32, device=param.device).mul_(0.02))


def _init_dummy_packed(name: str, param: nn.Parameter, gen: torch.Generator) -> None:
    """Packed MXFP4: random FP4 codes under a scale of 2^-7, so weights stay within ~±0.05 like the others."""
    if name.endswith("_scales"):
        param.fill_(127 - 7)
    else:
        param.copy_(torch.randint(0, 256, param.shape, generator=gen, dtype=torch.uint8, device=param.device))
