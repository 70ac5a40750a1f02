"""Linear layers whose weights load through the parameter: a fused layer (q/k/v, gate/up) knows where each
checkpoint tensor's rows go. The math is delegated to the layer's QuantMethod."""

from __future__ import annotations

import torch
from torch import nn

from microscale.quant.base import QuantMethod, UnquantizedLinearMethod, copy_checked


class Linear(nn.Module):
    """y = x W^T + b, with output rows made of one or more shards (`output_sizes`) loaded separately."""

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: QuantMethod | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, self.output_sizes, bias, dtype, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        """Copy a checkpoint tensor into `param`; `shard` picks the rows of one fused part."""
        if shard is None:
            target = param.data
        else:
            offset = sum(self.output_sizes[:shard])
            target = param.data.narrow(0, offset, self.output_sizes[shard])
        copy_checked(target, loaded)

    def load_weight(self, name: str, loaded: torch.Tensor, shard: int | None = None) -> list[str]:
        """Take checkpoint tensor `name` ("weight", "bias", ...) through the QuantMethod, which knows how this
        layer stores it; returns the parameter names filled."""
        return self.quant_method.load_weight(self, name, loaded, shard)

    def select_kernels(self, family: str, device: torch.device) -> None:
        self.quant_method.select_kernel(self, family, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)
