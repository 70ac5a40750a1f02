"""Benchmarks: datasets, offline throughput, online serving load."""


class BenchError(RuntimeError):
    """A benchmark run that failed for a reason worth one line, not a traceback (e.g. a peer's worker died)."""
