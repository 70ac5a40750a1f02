"""Which quantization each kind of layer gets, from the user's choice and the checkpoint's own format."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from microscale.quant.base import (
    ExpertsQuantMethod,
    QuantMethod,
    get_experts_method,
    get_quant_method,
    has_experts_method,
    known_quant_methods,
)

logger = logging.getLogger(__name__)

# Pre-quantized checkpoint formats microscale reads, and what they quantize: gpt-oss MXFP4 checkpoints
# hold their MoE experts in MXFP4 and everything else (attention, router, embeddings) in 16 bits.
_CHECKPOINT_FORMATS = {"mxfp4": "experts"}


@dataclass(frozen=True)
class QuantScheme:
    linear: str = "none"  # dense Linear layers (attention projections, dense MLPs)
    experts: str = "none"  # MoE experts

    def linear_method(self) -> QuantMethod:
        return get_quant_method(self.linear)

    def experts_method(self) -> ExpertsQuantMethod:
        return get_experts_method(self.experts)

    @classmethod
    def resolve(cls, quantization: str | None, checkpoint_quant: str | None) -> QuantScheme:
        """`quantization`: the user's load-time scheme (None: none); `checkpoint_quant`: the checkpoint's
        quantization_config.quant_method. A pre-quantized part keeps its format."""
        chosen = quantization or "none"
        if chosen not in known_quant_methods():
            known = ', '.join(known_quant_methods())
            raise ValueError(f"Unknown quantization {quantization!r}; choose one of {known}.")
        experts = chosen if has_experts_method(chosen) else "none"
        if checkpoint_quant is not None:
            if _CHECKPOINT_FORMATS.get(checkpoint_quant) != "experts":
                raise ValueError(
                    f"The checkpoint is quantized with {checkpoint_quant!r}, which microscale cannot load "
                    f"(supported: {', '.join(_CHECKPOINT_FORMATS)})."
                )
            if experts not in ("none", checkpoint_quant):
                logger.warning("experts stay in the checkpoint's %s (not %s)", checkpoint_quant, chosen)
            experts = checkpoint_quant
        return cls(linear=chosen, experts=experts)
