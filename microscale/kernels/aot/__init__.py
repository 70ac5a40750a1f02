"""Ahead-of-time compilation of the Triton kernels for real GPU targets, on a machine without a GPU."""
