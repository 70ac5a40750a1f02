"""FP8 and MXFP4 weights multiplied on the CPU without a 16-bit copy: a few tokens (decode) times a low-bit
weight, each weight byte decoded in vector registers as it is read (kernels/cpu/lowbit_gemv.c). At decode batch
sizes a matmul is bound by reading its weight; dequantising first writes and re-reads a 16-bit copy of it, which
made FP8 and MXFP4 slower than bfloat16 on a CPU although they hold a half and a quarter of its bytes.

The C source is compiled at first use with the machine's C compiler (`$CC`, else `cc`; the same one
torch.compile's CPU backend needs) and cached per source, compiler and flags under microscale's cache folder; a
machine without a C compiler or an x86-64 CPU with AVX2, FMA and F16C keeps the dequantising path (the kernel
selector logs why)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from microscale.cache_dir import microscale_cache_dir
from microscale.kernels.batch_invariant import batch_invariant_enabled

SOURCE = Path(__file__).with_name("cpu") / "lowbit_gemv.c"
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11"]
K_MULTIPLE = 32  # the kernels step through K in blocks of 32 (an MXFP4 block; two FP8 vectors)
MAX_TOKENS = 8  # more rows than this re-read the weight often enough that dequantise-then-matmul wins


def _bind(path: Path) -> ctypes.CDLL:
    """The built library with its entry points typed (CDLL releases the GIL for each call)."""
    lib = ctypes.CDLL(str(path))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.microscale_cpu_supported.restype = ctypes.c_int
    lib.microscale_fp8_gemv.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.microscale_fp8_gemv.restype = None
    lib.microscale_mxfp4_gemv.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.microscale_mxfp4_gemv.restype = None
    return lib


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and flags: from the cache, or compiled into it (written
    under a temporary name and renamed, so processes building at once never load a half-written file)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS]).encode()).hexdigest()[:16]
    target = microscale_cache_dir() / "cpu-kernels" / f"lowbit_gemv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True,
                           check=True)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why it cannot run here)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"written for x86-64 (AVX2), not {platform.machine()}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, or $CC) to build it with"
    try:
        library = _bind(_build(compiler))
    except subprocess.CalledProcessError as e:
        return None, f"{compiler} failed: {e.stderr.strip()[-500:]}"
    except OSError as e:
        return None, f"could not build or load it: {e}"
    if not library.microscale_cpu_supported():
        return None, "this CPU lacks AVX2, FMA or F16C"
    return library, None


def cpu_gemv_unavailable_reason(device: torch.device, k: int) -> str | None:
    """Why the low-bit CPU products cannot run a weight with `k` inputs on `device`, or None."""
    if device.type != "cpu":
        return f"a CPU kernel, not for {device.type}"
    if k % K_MULTIPLE:
        return f"needs K a multiple of {K_MULTIPLE} (K={k})"
    return _load()[1]


def cpu_gemv_applies(tokens: int) -> bool:
    """Whether the CPU kernel takes a matmul of `tokens` rows: up to MAX_TOKENS (more, in prefill, re-read the
    weight often enough that dequantise-then-matmul wins), and not in deterministic mode (whose 8-row matmuls
    must not depend on how many rows a step has)."""
    return tokens <= MAX_TOKENS and not batch_invariant_enabled()


def _output(x: torch.Tensor, n: int) -> torch.Tensor:
    """The float32 [M, n] result for a checked x."""
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 2:
        raise ValueError(f"x must be a contiguous float32 [M, K] tensor, got {x.dtype} {tuple(x.shape)}.")
    return torch.empty(x.shape[0], n, dtype=torch.float32)


def fp8_gemv(x: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] times w_q float8_e4m3fn [N, K] transposed: float32 [M, N], each product of the exact FP8
    value summed in float32 (no scale: the caller applies it to the [M, N] result)."""
    n, k = w_q.shape
    if w_q.dtype != torch.float8_e4m3fn or not w_q.is_contiguous() or x.shape[-1] != k or k % K_MULTIPLE:
        raise ValueError(f"w_q must be a contiguous float8_e4m3fn [N, K] with K={x.shape[-1]} a multiple of "
                         f"{K_MULTIPLE}, got {w_q.dtype} {tuple(w_q.shape)}.")
    y = _output(x, n)
    _library().microscale_fp8_gemv(x.data_ptr(), w_q.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                                   torch.get_num_threads())
    return y


def mxfp4_gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] times the MXFP4 weight (blocks uint8 [N, K / 32, 16], scales uint8 [N, K / 32])
    transposed: float32 [M, N], each block's products summed in float32, then times its scale."""
    n, groups = scales.shape
    k = groups * K_MULTIPLE
    if (blocks.shape != (n, groups, K_MULTIPLE // 2) or blocks.dtype != torch.uint8 or scales.dtype != torch.uint8
            or not (blocks.is_contiguous() and scales.is_contiguous()) or x.shape[-1] != k):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} (contiguous uint8) do "
                         f"not match x {tuple(x.shape)}.")
    y = _output(x, n)
    # Each block's even elements first, then its odd ones: the order the kernel reads low and high nibbles in.
    split = x.view(x.shape[0], groups, K_MULTIPLE // 2, 2).transpose(-1, -2).contiguous()
    _library().microscale_mxfp4_gemv(split.data_ptr(), blocks.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                     x.shape[0], n, k, torch.get_num_threads())
    return y


def _library() -> ctypes.CDLL:
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"The low-bit CPU kernels cannot run here: {reason}.")
    return library
