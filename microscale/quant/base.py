"""The quantization seam: a Linear layer owns a QuantMethod that creates, post-processes and applies its
weights. Schemes register by name, so the model code never branches on the quantization format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

WeightLoader = Callable[[nn.Parameter, torch.Tensor, int | None], None]

_REGISTRY: dict[str, type[QuantMethod]] = {}


def register_quant_method(name: str) -> Callable[[type[QuantMethod]], type[QuantMethod]]:
    def wrap(cls: type[QuantMethod]) -> type[QuantMethod]:
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_quant_method(name: str | None) -> QuantMethod:
    key = name or "none"
    if key not in _REGISTRY:
        raise ValueError(f"Unknown quantization {name!r}; known: {sorted(_REGISTRY)}.")
    return _REGISTRY[key]()


class QuantMethod(ABC):
    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        dtype: torch.dtype,
        weight_loader: WeightLoader,
    ) -> None:
        """Register the layer's parameters (each with a `weight_loader` that fills its slice)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Repack or quantize weights once the checkpoint is loaded."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W^T + b, in whatever form the weights are stored."""


@register_quant_method("none")
class UnquantizedLinearMethod(QuantMethod):
    def create_weights(self, layer, input_size, output_sizes, bias, dtype, weight_loader) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=dtype), requires_grad=False)
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.empty(sum(output_sizes), dtype=dtype), requires_grad=False)
            b.weight_loader = weight_loader
            layer.register_parameter("bias", b)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)
