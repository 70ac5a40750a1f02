"""Facts of the OCP Microscaling (MX) format that the kernels and the quant codec (quant/mxfp4.py) share; here,
at the bottom layer, so that kernels need not import from quant."""

MXFP4_BLOCK = 32  # values sharing one E8M0 scale
