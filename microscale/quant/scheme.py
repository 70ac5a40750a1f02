"""Which quantization each kind of layer gets, from the user's choice and the checkpoint's own format."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microscale.quant.base import ExpertsQuantMethod, QuantMethod
from microscale.quant.format import (
    NO_QUANT,
    WEIGHT_FORMATS,
    CheckpointQuant,
    checkpoint_formats,
    known_weight_formats,
    weight_format,
)

if TYPE_CHECKING:
    from microscale.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantScheme:
    linear: str = NO_QUANT  # weight format of the dense Linear layers (attention projections, dense MLPs)
    experts: str = NO_QUANT  # weight format of the MoE experts
    # Static scales come from the checkpoint (True) or must be calibrated (False).
    prequantized: bool = False
    # The checkpoint's own KV cache format (with k_scale / v_scale tensors), if any.
    checkpoint_kv_cache: str | None = None

    def linear_method(self) -> QuantMethod:
        return weight_format(self.linear).linear_method(self.prequantized)

    def experts_method(self) -> ExpertsQuantMethod:
        return weight_format(self.experts).experts_method_class()

    @property
    def needs_calibration(self) -> bool:
        """Static scales quantized at load time (not read from the checkpoint) must be measured on data."""
        return weight_format(self.linear).needs_calibration and not self.prequantized

    def filled_by_calibration(self, parameter: str) -> bool:
        """Whether calibration, after loading, gives `parameter` its value (so the checkpoint may lack it)."""
        return self.needs_calibration and parameter.endswith(weight_format(self.linear).calibrated_parameters)

    def tensor_parallel_problems(self, cfg: ModelConfig, n: int, whole_experts: bool) -> list[str]:
        problems = weight_format(self.linear).tensor_parallel_problems(cfg, n, whole_experts, linear=True)
        if self.experts != self.linear:
            problems += weight_format(self.experts).tensor_parallel_problems(cfg, n, whole_experts, linear=False)
        return problems

    @classmethod
    def resolve(cls, quantization: str | None, checkpoint_config: dict[str, Any] | None) -> QuantScheme:
        """`quantization`: the user's load-time format (None: none); `checkpoint_config`: config.json's
        quantization_config of a pre-quantized checkpoint. A pre-quantized part keeps its format."""
        chosen = quantization or NO_QUANT
        if chosen not in WEIGHT_FORMATS:
            known = ", ".join(known_weight_formats())
            raise ValueError(f"Unknown quantization {quantization!r}; choose one of {known}.")
        experts = chosen if weight_format(chosen).experts_method_class is not None else NO_QUANT
        if (checkpoint_config or {}).get("quant_method") is None:
            return cls(linear=chosen, experts=experts)
        checkpoint = _read_checkpoint(checkpoint_config)
        if checkpoint.experts is not None:
            if experts not in (NO_QUANT, checkpoint.experts):
                logger.warning("experts stay in the checkpoint's %s (not %s)", checkpoint.experts, chosen)
            experts = checkpoint.experts
        if checkpoint.linear is None:
            return cls(linear=chosen, experts=experts)
        if chosen not in (NO_QUANT, checkpoint.linear):
            raise ValueError(
                f"The checkpoint is already quantized ({checkpoint.linear}); it cannot be loaded as {chosen}."
            )
        return cls(linear=checkpoint.linear, experts=experts, prequantized=True,
                   checkpoint_kv_cache=checkpoint.kv_cache)


def _read_checkpoint(config: dict[str, Any]) -> CheckpointQuant:
    """The formats a checkpoint's quantization_config fixes, asked of the formats of its quant_method."""
    method = config["quant_method"]
    formats = checkpoint_formats(method)
    if not formats:
        supported = sorted({cls.checkpoint_method for _, cls in WEIGHT_FORMATS.items() if cls.checkpoint_method})
        raise ValueError(
            f"The checkpoint is quantized with {method!r}, which microscale cannot load (supported: "
            f"{', '.join(supported)})."
        )
    for fmt in formats:
        found = fmt.read_checkpoint(config)
        if found is not None:
            return found
    loadable = ", or ".join(fmt.checkpoint_description for fmt in formats)
    raise ValueError(f"Unsupported {method} scheme: microscale loads {loadable}.")
