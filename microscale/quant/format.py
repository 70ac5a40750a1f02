"""Weight quantization formats. One class per format owns all microscale knows about it: the quantization_config
its checkpoints carry, the method each kind of layer gets, whether it needs calibration, the names `microscale
quantize` writes its tensors under, and what tensor parallelism must divide for it. Formats register by name;
the rest of microscale asks the registry and never branches on a format's name.

Adding a format: one file with a `@register_weight_format` class, imported in microscale/quant/__init__.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from microscale.quant.base import ExpertsQuantMethod, QuantMethod, UnquantizedExpertsMethod, UnquantizedLinearMethod
from microscale.quant.registry import Registry

if TYPE_CHECKING:
    from microscale.config import ModelConfig
    from microscale.quant.kv_cache import KVCache

NO_QUANT = "none"  # the model dtype, everywhere

TensorTransform = Callable[[str, torch.Tensor], Iterator[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class CheckpointQuant:
    """What a pre-quantized checkpoint fixes: the format of its Linear layers (every scale comes from the
    checkpoint), of its MoE experts, and of its KV cache (with static scales); None: that part is not quantized."""

    linear: str | None = None
    experts: str | None = None
    kv_cache: str | None = None


@dataclass
class CheckpointExport:
    """How `microscale quantize` writes a checkpoint in a format: each source tensor becomes the tensors
    `transform` yields, `extra` tensors are added, and config.json gets `quantization_config`."""

    transform: TensorTransform
    quantization_config: dict[str, Any]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class WeightFormat:
    name: ClassVar[str]
    linear_method_class: ClassVar[type[QuantMethod]]
    # None: the format leaves MoE experts in the model dtype.
    experts_method_class: ClassVar[type[ExpertsQuantMethod] | None] = None
    # config.json's quantization_config.quant_method of checkpoints in this format (None: it has none).
    checkpoint_method: ClassVar[str | None] = None
    # What a checkpoint of that quant_method must hold to be this format, for the error when none fits.
    checkpoint_description: ClassVar[str] = ""
    # Static scales that a checkpoint carries, or calibration measures when the format is applied at load time.
    needs_calibration: ClassVar[bool] = False
    # Suffixes of the parameters calibration fills (a checkpoint quantized at load time lacks them).
    calibrated_parameters: ClassVar[tuple[str, ...]] = ()
    # `microscale quantize` writes it; `exports_served_weights`: from an engine serving the model in this format
    # (its calibrated scales), else from the checkpoint's tensors alone.
    exportable: ClassVar[bool] = False
    exports_served_weights: ClassVar[bool] = False

    def linear_method(self, prequantized: bool = False) -> QuantMethod:
        return self.linear_method_class(prequantized)

    def read_checkpoint(self, quantization_config: dict[str, Any]) -> CheckpointQuant | None:
        """What a checkpoint whose quant_method is this format's fixes; None: that config is another format's."""
        return None

    def tensor_parallel_problems(self, cfg: ModelConfig, n: int, whole_experts: bool, linear: bool) -> list[str]:
        """What does not divide over `n` ranks for this format, as "<what> (<why>)" phrases. `linear`: it
        quantizes the Linear layers too (else only the MoE experts); `whole_experts`: experts are not split."""
        return []

    def export(self, cfg: ModelConfig, model: nn.Module | None, kv_caches: list[KVCache]) -> CheckpointExport:
        """The checkpoint of the model `cfg` describes; `model` and `kv_caches` are the served ones when
        `exports_served_weights`."""
        raise ValueError(f"Cannot write {self.name} checkpoints.")


WEIGHT_FORMATS: Registry[type[WeightFormat]] = Registry("quantization")


def register_weight_format(cls: type[WeightFormat]) -> type[WeightFormat]:
    return WEIGHT_FORMATS.register(cls.name)(cls)


def weight_format(name: str | None) -> WeightFormat:
    """The format `name` (None: no quantization)."""
    return WEIGHT_FORMATS.get(name)()


def known_weight_formats() -> list[str]:
    return WEIGHT_FORMATS.names()


def exportable_weight_formats() -> list[str]:
    return [name for name in WEIGHT_FORMATS.names() if WEIGHT_FORMATS.get(name).exportable]


def checkpoint_formats(quant_method: str) -> list[WeightFormat]:
    """The formats whose checkpoints carry quantization_config.quant_method == `quant_method`."""
    return [cls() for _, cls in WEIGHT_FORMATS.items() if cls.checkpoint_method == quant_method]


@register_weight_format
class UnquantizedFormat(WeightFormat):
    name = NO_QUANT
    linear_method_class = UnquantizedLinearMethod
    experts_method_class = UnquantizedExpertsMethod
