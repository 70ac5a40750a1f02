"""Quantization schemes. Importing the package registers every scheme under its name."""

from microscale.quant import fp8, mxfp4_experts, mxfp4_linear  # noqa: F401 - registration
from microscale.quant.base import known_quant_methods

__all__ = ["known_quant_methods"]
