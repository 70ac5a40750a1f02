"""Quantization formats. Importing the package registers every weight format under its name (one line each)."""

from microscale.quant import fp8_formats, mxfp4_format  # noqa: F401 - registration
