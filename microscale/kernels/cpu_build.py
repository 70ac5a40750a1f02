"""The C kernels for CPUs (kernels/cpu/*.c), built at first use with the machine's C compiler (`$CC`, else
`cc`: the one torch.compile's CPU backend needs too) and cached per source, compiler and flags under
microscale's cache folder, then loaded with ctypes (whose calls release the GIL). A machine without a compiler,
or an x86-64 CPU without AVX2, FMA and F16C, gets the reason instead, and callers keep their torch paths."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from microscale.cache_dir import microscale_cache_dir

SOURCES = Path(__file__).with_name("cpu")
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the F32 / BF16 / F16 of cpu/simd.h


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def _build(compiler: str, source: Path) -> Path:
    """The shared library for this source (and the headers beside it), compiler and flags: from the cache, or
    compiled into it (written under a temporary name and renamed, so processes building at once never load a
    half-written file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [source.read_text(), *(header.read_text() for header in sorted(SOURCES.glob("*.h")))]
    key = hashlib.sha256("\0".join([*texts, compiler, version, *FLAGS]).encode()).hexdigest()[:16]
    target = microscale_cache_dir() / "cpu-kernels" / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(source), "-o", partial, "-lm"], capture_output=True, text=True,
                           check=True)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


def load_cpu_library(source_name: str, bind: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library built from kernels/cpu/`source_name`, its entry points typed by `bind`, None), or (None, why
    it cannot run here). Every source exports `int microscale_cpu_supported(void)`: whether this CPU has the
    instructions it was written for."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"written for x86-64 (AVX2), not {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, or $CC) to build it with"
    try:
        library = ctypes.CDLL(str(_build(compiler, SOURCES / source_name)))
    except subprocess.CalledProcessError as e:
        return None, f"{compiler} failed: {e.stderr.strip()[-500:]}"
    except OSError as e:
        return None, f"could not build or load it: {e}"
    library.microscale_cpu_supported.restype = ctypes.c_int
    if not library.microscale_cpu_supported():
        return None, "this CPU lacks AVX2, FMA or F16C"
    bind(library)
    return library, None


def loaded_library(loaded: tuple[ctypes.CDLL | None, str | None], what: str) -> ctypes.CDLL:
    """The library of a load_cpu_library result; RuntimeError naming `what` and the reason when there is none."""
    library, reason = loaded
    if library is None:
        raise RuntimeError(f"{what} cannot run here: {reason}.")
    return library
