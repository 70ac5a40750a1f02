"""Compile Triton kernels ahead of time for real NVIDIA targets on a machine with no GPU.

The interpreter (TRITON_INTERPRET=1) accepts code the real compiler rejects, so every kernel is also compiled
for sm_80 / sm_89 / sm_90 (/ sm_100): a stand-in driver reports the target, and each launch through a kernel's
real Python wrapper goes through Triton's own binder (argument specialisation, constexprs, options) and
compiler down to a cubin (with the ptxas bundled in the Triton wheel), but is never run. Registers and local
memory (what Triton reports as spills) are read from the cubin with the bundled cuobjdump.

This leans on Triton internals (JITFunction.run's warmup path, the driver registry): the dev extra pins the
Triton version. Run it in a process where TRITON_INTERPRET is unset: kernel modules fix interpreter-dependent
constexprs when they are imported.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# CUDA's launch limits on grid dimensions y and z (x may go to 2^31 - 1).
_GRID_LIMITS = (2**31 - 1, 65535, 65535)


class _TargetDriver(DriverBase):
    """Just enough of a driver for Triton to bind and compile for `arch`: no device is ever touched."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> tuple[str, int]:
        return ("aot", self.target.arch)  # one kernel cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("ahead-of-time compilation runs nothing")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("ahead-of-time compilation builds no launcher")


@dataclass
class CompiledKernel:
    """One compiled specialisation of a kernel, as launched."""

    kernel: str
    arch: int
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory per program (Triton's allocation)
    registers: int  # per thread
    spills: int  # stack frame bytes per thread: ptxas's spill stores (Triton kernels keep no local arrays)
    constexprs: str


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) of the only function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = _RESOURCES.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{out}")
    return int(match.group(1)), int(match.group(2))


def _grid(grid, bound: dict) -> tuple[int, ...]:
    if callable(grid):
        grid = grid(bound)
    return tuple(int(g) for g in grid)


class Recorder:
    """Compiles every kernel launched inside `target(arch)` instead of running it."""

    def __init__(self) -> None:
        self.launches: list[CompiledKernel] = []
        self._usage: dict[int, tuple[int, int]] = {}  # by id of the compiled kernel: cuobjdump once each

    def _record(self, fn: JITFunction, compiled, arch: int, grid, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(fn.arg_names, args)) | kwargs
        grid = _grid(grid, bound)
        for dim, (size, limit) in enumerate(zip(grid, _GRID_LIMITS)):
            if not 0 <= size <= limit:
                raise ValueError(f"{fn.__name__}: grid dimension {dim} is {size}, past CUDA's limit {limit}")
        key = id(compiled)
        if key not in self._usage:
            self._usage[key] = _resource_usage(compiled.asm["cubin"])
        registers, spills = self._usage[key]
        constexprs = ", ".join(f"{name}={bound[name]}" for name in fn.arg_names
                               if name in bound and fn.params[fn.arg_names.index(name)].is_constexpr)
        self.launches.append(CompiledKernel(
            fn.__name__, arch, grid, compiled.metadata.num_warps, compiled.metadata.num_stages,
            compiled.metadata.shared, registers, spills, constexprs,
        ))

    @contextlib.contextmanager
    def target(self, arch: int) -> Iterator[None]:
        """Inside: kernels compile for sm_`arch` and are recorded, not run; torch.cuda reports that capability
        (for the engine's own capability checks)."""
        recorder = self
        original_run = JITFunction.run

        def compile_only(fn: JITFunction, *args, grid, warmup, **kwargs):
            compiled = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder._record(fn, compiled, arch, grid, args, kwargs)
            return compiled

        previous = driver._active  # None unless a GPU driver was started: then it comes back lazily
        driver.set_active(_TargetDriver(arch))
        try:
            with mock.patch.object(JITFunction, "run", compile_only), \
                    mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10)):
                yield
        finally:
            driver.set_active(previous)


def ptxas_supports(arch: int) -> bool:
    """Whether a ptxas bundled with Triton assembles for sm_`arch` (its --help lists the GPU names it takes)."""
    for name in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(_BIN, name)
        if os.path.exists(path):
            listed = subprocess.run([path, "--help"], capture_output=True, text=True).stdout
            if re.search(rf"'sm_{arch}'", listed):
                return True
    return False
