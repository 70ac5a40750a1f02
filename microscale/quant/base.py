"""The quantization seam: a Linear layer owns a QuantMethod that creates, loads, post-processes and applies
its weights; an MoE layer's experts own an ExpertsQuantMethod. Each weight format (microscale/quant/format.py)
names its methods, so the model code never branches on the quantization format."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from microscale.kernels.cpu_linear import dense_linear

WeightLoader = Callable[[nn.Parameter, torch.Tensor, int | None], None]


class QuantMethod(ABC):
    def __init__(self, prequantized: bool = False) -> None:
        # True when the checkpoint is already in this format: every scale must come from it.
        self.prequantized = prequantized
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

    def load_weight(self, layer: nn.Module, name: str, loaded: torch.Tensor, shard: int | None) -> list[str]:
        """Fill the layer from checkpoint tensor `name` ("weight", "bias", ...; `shard` picks a fused part);
        returns the names of the parameters it filled. By default the parameter of that name takes it; a
        scheme that stores weights differently (packed MXFP4) converts here, one tensor at a time."""
        param = getattr(layer, name, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"Checkpoint tensor {name!r} has no place in a {type(self).__name__} layer.")
        param.weight_loader(param, loaded, shard)
        return [name]

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Repack or quantize weights once the checkpoint is loaded."""

    def select_kernel(self, layer: nn.Module, family: str, device: torch.device) -> None:  # noqa: B027 - optional
        """Pick the matmul kernel for `apply` from this scheme's ordered candidates ("torch" lists only the
        reference; "triton" lists the fast kernels first). Called once by the model runner."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W^T + b, in whatever form the weights are stored."""

    def loads_slices(self, name: str, checkpoint_dtype: str) -> bool:
        """Whether a tensor-parallel rank may read only its slice of checkpoint tensor `name` (safetensors dtype
        string, e.g. "BF16", "F8_E4M3"): false where quantising needs the whole tensor (its scale)."""
        return True

    def static_fp8_input_scale(self, layer: nn.Module) -> torch.Tensor | None:
        """The fixed scale this layer quantises its input to FP8 with, when it has one: the op before it may
        then emit FP8 directly (fused) and call `apply_fp8_input`. None: it takes 16-bit input."""
        return None

    def apply_fp8_input(self, layer: nn.Module, x_q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes no FP8 input.")


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
        return dense_linear(x, layer.weight, layer.bias)


# ---- MoE experts ------------------------------------------------------------------------------------------

class ExpertsQuantMethod(ABC):
    """Storage of an MoE layer's experts: w13 [experts, 2 * intermediate, hidden] (gate rows, then up rows)
    and w2 [experts, hidden, intermediate], each with an optional bias [experts, out]. Checkpoint tensors
    arrive already in that orientation (the model converts its checkpoint's layout)."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool,
        dtype: torch.dtype,
    ) -> None:
        """Register the experts' parameters on `layer`."""

    def load_weight(self, layer: nn.Module, name: str, loaded: torch.Tensor) -> list[str]:
        """Fill parameter `name` ("w13", "w2_bias", ...); returns the names of the parameters filled."""
        param = getattr(layer, name, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"Checkpoint tensor for {name!r} has no place in {type(self).__name__} experts.")
        copy_checked(param, loaded)
        return [name]

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional hook
        """Repack weights once the checkpoint is loaded."""

    @abstractmethod
    def expert_weights(self, layer: nn.Module, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) of one expert in `dtype`, ready for F.linear."""

    def expert_linears(self, layer: nn.Module, expert: int, dtype: torch.dtype, tokens: int) -> tuple[
            Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], ...]:
        """(w13, w2) of one expert as functions (x, bias) -> x @ w.T + bias, for `tokens` rows of x in `dtype`:
        dense_linear on expert_weights here; a format may multiply without decoding its weights."""
        w13, w2 = self.expert_weights(layer, expert, dtype)
        return (lambda x, bias: dense_linear(x, w13, bias)), (lambda x, bias: dense_linear(x, w2, bias))

    @abstractmethod
    def fused_operands(self, layer: nn.Module) -> dict[str, torch.Tensor | None]:
        """All experts as the fused MoE kernel takes them: w13, w2, and w13_scales / w2_scales when packed."""


def copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"Checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}.")
    param.data.copy_(loaded)


def _parameter(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


def create_expert_biases(layer: nn.Module, num_experts: int, hidden: int, intermediate: int, bias: bool,
                         dtype: torch.dtype) -> None:
    """w13_bias / w2_bias (or None): kept in the activation dtype by every scheme."""
    layer.register_parameter("w13_bias", _parameter((num_experts, 2 * intermediate), dtype) if bias else None)
    layer.register_parameter("w2_bias", _parameter((num_experts, hidden), dtype) if bias else None)


class UnquantizedExpertsMethod(ExpertsQuantMethod):
    def create_weights(self, layer, num_experts, hidden_size, intermediate_size, bias, dtype) -> None:
        layer.register_parameter("w13", _parameter((num_experts, 2 * intermediate_size, hidden_size), dtype))
        layer.register_parameter("w2", _parameter((num_experts, hidden_size, intermediate_size), dtype))
        create_expert_biases(layer, num_experts, hidden_size, intermediate_size, bias, dtype)

    def expert_weights(self, layer, expert, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.w13[expert], layer.w2[expert]

    def fused_operands(self, layer) -> dict[str, torch.Tensor | None]:
        return {"w13": layer.w13, "w2": layer.w2, "w13_scales": None, "w2_scales": None}
