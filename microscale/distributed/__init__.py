"""Tensor parallelism on torch.distributed: the process group and collectives (parallel_state.py), launch
helpers (launch.py). Whether a model divides over N ranks (engine/split_checks.py) and the ranks themselves
(engine/executor.py, engine/worker.py) are the engine's."""
