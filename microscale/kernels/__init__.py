"""Triton kernels for the hot ops, each beside the torch reference it must match (attention backends,
layers/norm.py, layers/activation.py, quant/kv_cache.py). Imported only when the Triton family is chosen:
`TRITON_INTERPRET` is read when a kernel is defined."""
