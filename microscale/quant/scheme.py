"""Which quantization each kind of layer gets, from the user's choice and the checkpoint's own format."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from microscale.quant.base import (
    EXPERTS_METHODS,
    ExpertsQuantMethod,
    QuantMethod,
    get_experts_method,
    get_quant_method,
    known_quant_methods,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantScheme:
    linear: str = "none"  # dense Linear layers (attention projections, dense MLPs)
    experts: str = "none"  # MoE experts
    # Static scales come from the checkpoint (True) or must be calibrated (False).
    prequantized: bool = False
    # The checkpoint's own KV cache scheme ("fp8" with k_scale / v_scale tensors), if any.
    checkpoint_kv_cache: str | None = None

    def linear_method(self) -> QuantMethod:
        return get_quant_method(self.linear, self.prequantized)

    def experts_method(self) -> ExpertsQuantMethod:
        return get_experts_method(self.experts)

    @property
    def needs_calibration(self) -> bool:
        """Static FP8 activation scales quantized at load time must be measured on calibration data."""
        return self.linear == "fp8" and not self.prequantized

    @classmethod
    def resolve(cls, quantization: str | None, checkpoint_config: dict[str, Any] | None) -> QuantScheme:
        """`quantization`: the user's load-time scheme (None: none); `checkpoint_config`: config.json's
        quantization_config of a pre-quantized checkpoint. A pre-quantized part keeps its format."""
        chosen = quantization or "none"
        if chosen not in known_quant_methods():
            known = ", ".join(known_quant_methods())
            raise ValueError(f"Unknown quantization {quantization!r}; choose one of {known}.")
        experts = chosen if chosen in EXPERTS_METHODS else "none"
        method = (checkpoint_config or {}).get("quant_method")
        if method is None:
            return cls(linear=chosen, experts=experts)
        if method == "mxfp4":  # gpt-oss: MXFP4 experts, everything else in 16 bits
            if experts not in ("none", "mxfp4"):
                logger.warning("experts stay in the checkpoint's mxfp4 (not %s)", chosen)
            return cls(linear=chosen, experts="mxfp4")
        if method == "compressed-tensors":
            linear, kv = _compressed_tensors_scheme(checkpoint_config)
            if chosen not in ("none", linear):
                raise ValueError(f"The checkpoint is already quantized ({linear}); it cannot be loaded as {chosen}.")
            return cls(linear=linear, experts="none", prequantized=True, checkpoint_kv_cache=kv)
        raise ValueError(
            f"The checkpoint is quantized with {method!r}, which microscale cannot load "
            "(supported: mxfp4, compressed-tensors FP8)."
        )


def _compressed_tensors_scheme(config: dict[str, Any]) -> tuple[str, str | None]:
    """(linear scheme, KV cache scheme) of a compressed-tensors FP8 config (the naming vLLM loads)."""
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError("compressed-tensors checkpoints with other than one config group are not supported.")
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    fp8 = all(part.get("type") == "float" and part.get("num_bits") == 8 for part in (weights, inputs))
    if fp8 and weights.get("strategy") == "tensor" and inputs.get("strategy") == "tensor" and not inputs.get("dynamic"):
        linear = "fp8"
    elif fp8 and weights.get("strategy") == "channel" and inputs.get("strategy") == "token" and inputs.get("dynamic"):
        linear = "fp8-dynamic"
    else:
        raise ValueError(
            "Unsupported compressed-tensors scheme: microscale loads FP8 with per-tensor weights and static "
            "per-tensor activations, or per-channel weights and dynamic per-token activations."
        )
    kv = config.get("kv_cache_scheme")
    if kv and not (kv.get("type") == "float" and kv.get("num_bits") == 8):
        raise ValueError(f"Unsupported kv_cache_scheme in the checkpoint: {kv}.")
    return linear, "fp8" if kv else None
