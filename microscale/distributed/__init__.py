"""Tensor parallelism on torch.distributed: the process group and collectives (parallel_state.py), launch
helpers (launch.py), and the divisibility checks made before any process starts (checks.py). The ranks
themselves are the engine's to start and run (engine/executor.py, engine/worker.py)."""
