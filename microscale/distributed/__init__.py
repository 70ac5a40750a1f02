"""Tensor parallelism on torch.distributed: the process group and collectives (parallel_state.py), the
workers that run the other ranks' shards (workers.py), and the divisibility checks made before any process
starts (checks.py)."""
