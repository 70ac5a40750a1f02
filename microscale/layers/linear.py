"""Linear layers whose weights load through the parameter: a fused layer (q/k/v, gate/up) knows where each
checkpoint tensor's rows go, and a tensor-parallel one which slice of them is its own. The math is delegated
to the layer's QuantMethod."""

from __future__ import annotations

import torch
from torch import nn

from microscale.distributed.parallel_state import all_reduce, tp_rank, tp_size
from microscale.quant.base import QuantMethod, UnquantizedLinearMethod, copy_checked
from microscale.quant.fp8 import FP8_DTYPE


class Linear(nn.Module):
    """y = x W^T + b, with output rows made of one or more shards (`output_sizes`) loaded separately.

    Tensor parallel (`parallel`): "column" keeps this rank's rows of every shard (`shard_starts[i]`: where they
    begin in shard i of the checkpoint, by default rank * local size); "row" keeps its slice of the input
    columns and sums the ranks' partial outputs (the bias is added once, by rank 0). Sizes given here are
    this rank's."""

    def __init__(
        self,
        input_size: int,
        output_sizes: int | list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        quant_method: QuantMethod | None = None,
        parallel: str | None = None,
        shard_starts: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.dtype = dtype
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.parallel = parallel if tp_size() > 1 else None
        self.shard_starts = shard_starts or [tp_rank() * size for size in self.output_sizes]
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, self.output_sizes, bias, dtype, self.weight_loader)

    @property
    def checkpoint_input_size(self) -> int:
        """Input columns of the whole checkpoint weight (a row-parallel rank keeps 1 / tp_size of them)."""
        return self.input_size * (tp_size() if self.parallel == "row" else 1)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        """Copy a checkpoint tensor into `param`; `shard` picks the rows of one fused part."""
        loaded = self._rank_slice(param, loaded, shard)
        if shard is None:
            target = param.data
        else:
            offset = sum(self.output_sizes[:shard])
            target = param.data.narrow(0, offset, self.output_sizes[shard])
        copy_checked(target, loaded)

    def checkpoint_slice(
        self, name: str, shard: int | None, shape: tuple[int, ...], dtype: str
    ) -> tuple[int, int, int] | None:
        """(dim, start, length) of a checkpoint tensor this rank keeps, when its scheme can load that slice alone
        (so only the slice is read from disk); None: the whole tensor is needed (or kept whole)."""
        if self.parallel is None or len(shape) == 0 or not self.quant_method.loads_slices(name, dtype):
            return None
        if self.parallel == "column":
            index = shard or 0
            if shape[0] < self.output_sizes[index]:
                return None  # a per-tensor scale, kept whole
            return 0, self.shard_starts[index], self.output_sizes[index]
        if len(shape) >= 2:  # a weight's input columns (packed MXFP4 tensors count 32-value groups)
            size = self.input_size if name == "weight" else getattr(self, name).shape[1]
            return 1, tp_rank() * size, size
        return None

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None) -> torch.Tensor:
        """This rank's part of a whole checkpoint tensor (a tensor already read as that part passes as is).
        Per-tensor scales ([] or one per shard) are whole."""
        if self.parallel == "column" and loaded.dim() >= 1:
            index = shard or 0
            if loaded.shape[0] == self.output_sizes[index]:
                return loaded  # read as this rank's slice (or a part every rank shares whole)
            return loaded.narrow(0, self.shard_starts[index], self.output_sizes[index])
        if self.parallel == "row":
            # weight [out, in], or packed MXFP4 [out, in / 32, ...]: dim 1 runs along the input
            if loaded.dim() >= 2 and loaded.shape[1] != param.shape[1]:
                size = param.shape[1]
                return loaded.narrow(1, tp_rank() * size, size)
            if param is getattr(self, "bias", None) and tp_rank() != 0:
                return torch.zeros_like(loaded)  # the ranks' outputs are summed: one bias in the sum
        return loaded

    def load_weight(self, name: str, loaded: torch.Tensor, shard: int | None = None) -> list[str]:
        """Take checkpoint tensor `name` ("weight", "bias", ...) through the QuantMethod, which knows how this
        layer stores it; returns the parameter names filled."""
        return self.quant_method.load_weight(self, name, loaded, shard)

    def select_kernels(self, family: str, device: torch.device) -> None:
        self.quant_method.select_kernel(self, family, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in the model dtype, or in FP8 already quantised with static_fp8_input_scale() (by a fused norm or
        activation before this layer)."""
        if x.dtype == FP8_DTYPE:
            y = self.quant_method.apply_fp8_input(self, x, self.dtype)
        else:
            y = self.quant_method.apply(self, x)
        return all_reduce(y) if self.parallel == "row" else y

    def static_fp8_input_scale(self) -> torch.Tensor | None:
        """The fixed FP8 scale of this layer's input, if its scheme has one (the op before may then emit FP8)."""
        return self.quant_method.static_fp8_input_scale(self)
