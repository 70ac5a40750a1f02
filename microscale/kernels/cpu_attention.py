"""A layer's attention step on the CPU over the paged KV cache in place (kernels/cpu/decode_attention.c): the
step's new keys and values are written into their slots, then each decoding sequence's one query reads the keys
and values its block table points at, its GQA group sharing every row read, in float32 with a vectorised
softmax. The torch path pads every sequence to the step's longest context and pays a dozen small ops per layer
(index writes, a mask, a gather or a decode-buffer copy, SDPA's set-up): at batch 1 they cost more than the
attention itself, and each costs more again inside a forward, whose weights keep evicting torch's code and data
from the caches.

For caches that store the model dtype (float32, bfloat16, float16); quantised caches keep the torch path. The
caches are checked and bound once, the step's index tensors once per step (set_step), so a layer's call checks
only its own q, k, v and out.

bfloat16 caches on a CPU with AMX also attend prefill chunks here (`prefill`, kernels/cpu/prefill_attention.c),
over the same paged blocks: flash-style on tiles, 1.1-2.3x torch's SDPA and no gathered copy or mask for a chunk
that follows cached tokens."""

from __future__ import annotations

import ctypes
import functools

import torch

from microscale.kernels.cpu_build import DTYPE_CODES, load_cpu_library, loaded_library

HEAD_DIM_MULTIPLE = 16
MAX_HEAD_DIM = 256
AMX_HEAD_DIM_MULTIPLE = 32  # a tile row holds 32 bfloat16 dimensions
# A fresh prefill chunk longer than this, of heads this large or larger, goes to torch's SDPA (see prefill_applies).
LONG_CHUNK_QUERIES, LONG_CHUNK_HEAD_DIM = 768, 128


def _bind(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.microscale_cpu_attention_step.argtypes = [
        ptr, i64, ptr, i64, ptr, ptr, i64,  # new keys and values, their slots
        ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64,  # q, caches, block tables, positions, out
        i64, i64, i64, i64, i64, ctypes.c_float, i64, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    lib.microscale_cpu_attention_step.restype = ctypes.c_int
    lib.microscale_amx_supported.restype = ctypes.c_int


def _bind_prefill(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.microscale_cpu_prefill_attention.argtypes = [
        ptr, i64, ptr, ptr, ptr, i64, i64, ptr, i64,  # q, caches, block table, chunk, out
        i64, i64, i64, i64, ctypes.c_float, i64, ptr, ctypes.c_int,
    ]
    lib.microscale_cpu_prefill_attention.restype = ctypes.c_int


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    return load_cpu_library("decode_attention.c", _bind)


@functools.cache
def _load_prefill() -> tuple[ctypes.CDLL | None, str | None]:
    return load_cpu_library("prefill_attention.c", _bind_prefill)


def cpu_attention_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the CPU attention kernel cannot serve caches of this device, dtype and head size, or None."""
    if device.type != "cpu":
        return f"a CPU kernel, not for {device.type}"
    if dtype not in DTYPE_CODES:
        return f"reads caches of float32, bfloat16 or float16, not {dtype}"
    if head_dim % HEAD_DIM_MULTIPLE or head_dim > MAX_HEAD_DIM:
        return f"needs a head size that is a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM} (it is {head_dim})"
    return _load()[1]


def _token_stride(x: torch.Tensor, name: str, dtype: torch.dtype, heads: int, dim: int) -> int:
    """The element stride between the tokens of x [tokens, heads, dim], whose heads and dims must be contiguous."""
    shape, stride = x.shape, x.stride()
    if x.dtype != dtype or len(shape) != 3 or shape[1] != heads or shape[2] != dim or stride[1:] != (dim, 1):
        raise ValueError(f"{name} must be {dtype} [tokens, {heads}, {dim}] with contiguous heads, got {x.dtype} "
                         f"{tuple(shape)} strides {stride}.")
    return stride[0]


def _index(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype != torch.int64 or x.stride(-1) != 1 or x.device.type != "cpu":
        raise ValueError(f"{name} must be CPU int64 with contiguous rows, got {x.dtype} {tuple(x.shape)}.")
    return x


class CpuAttention:
    """The attention steps of one model's layers, each over its (keys, values) cache pair [blocks, block_size,
    kv_heads, head_dim] (contiguous, one dtype for all). bfloat16 caches with a head size that is a multiple of
    32 get their decode scores from AMX tile products on a CPU that has them, and their prefill chunks a flash
    kernel on AMX (`prefill`; `amx=False`: the vector path for decodes, no prefill kernel)."""

    def __init__(self, caches: list[tuple[torch.Tensor, torch.Tensor]], amx: bool = True) -> None:
        keys = caches[0][0]
        self.dtype = keys.dtype
        _, self.block_size, self.kv_heads, self.head_dim = keys.shape
        for k_cache, v_cache in caches:
            for cache in (k_cache, v_cache):
                if cache.shape != keys.shape or cache.dtype != self.dtype or not cache.is_contiguous():
                    raise ValueError(f"every cache must be contiguous {self.dtype} {tuple(keys.shape)}, got "
                                     f"{cache.dtype} {tuple(cache.shape)}.")
        reason = cpu_attention_unavailable_reason(keys.device, self.dtype, self.head_dim)
        if reason is not None:
            raise ValueError(f"The CPU attention kernel cannot serve these caches: {reason}.")
        self.amx = (amx and self.dtype == torch.bfloat16 and self.head_dim % AMX_HEAD_DIM_MULTIPLE == 0
                    and bool(_library().microscale_amx_supported()))
        # key tiles of 16 rows load from one cache block
        self.amx_prefill = self.amx and self.block_size % 16 == 0 and _load_prefill()[0] is not None
        self._caches = caches  # kept alive while bound: the kernel writes to their addresses
        self._pointers = [(k.data_ptr(), v.data_ptr()) for k, v in caches]
        self._step: tuple | None = None
        self._decodes = 0

    def set_step(self, slot_blocks: torch.Tensor, slot_offsets: torch.Tensor, block_tables: torch.Tensor | None,
                 positions: torch.Tensor | None) -> None:
        """This step's slots of its new tokens (int64 [T] each) and, when it has decodes (the first n tokens),
        their block tables (int64 [n, max_blocks]) and positions (int64 [n])."""
        tokens = slot_blocks.shape[0]
        if slot_offsets.shape != (tokens,):
            raise ValueError(f"slot_offsets {tuple(slot_offsets.shape)} must match slot_blocks ({tokens},).")
        n = 0 if positions is None else positions.shape[0]
        if n and (block_tables is None or block_tables.dim() != 2 or block_tables.shape[0] != n or n > tokens):
            raise ValueError(f"{n} decodes of {tokens} tokens need block tables [{n}, max_blocks].")
        kept = (_index(slot_blocks, "slot_blocks"), _index(slot_offsets, "slot_offsets"))
        if n:
            kept += (_index(block_tables, "block_tables"), _index(positions, "positions"))
        self._decodes = n
        self._step = (
            kept,  # kept alive until the next step
            kept[0].data_ptr(), kept[1].data_ptr(), tokens,
            kept[2].data_ptr() if n else None, kept[2].stride(0) if n else 0, kept[3].data_ptr() if n else None,
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 scale: float, window: int | None, sinks: torch.Tensor | None) -> None:
        """Write layer `layer`'s new keys and values k, v [T, kv_heads, head_dim] into its cache, then attend:
        out[i] = attention of the decode query q[i] ([T, heads, head_dim]) over keys 0..positions[i] of its
        sequence (the last `window` when given), for i < n; rows of out past n are left as they are. sinks:
        float32 [heads] or None."""
        if self._step is None:
            raise RuntimeError("CpuAttention: set_step must come before the layers of a step.")
        _, slot_blocks, slot_offsets, tokens, tables, table_stride, positions = self._step
        heads, dim, kv_heads, dtype, n = q.shape[1], self.head_dim, self.kv_heads, self.dtype, self._decodes
        self._check_heads(heads, sinks)
        k_stride, v_stride = _token_stride(k, "k", dtype, kv_heads, dim), _token_stride(v, "v", dtype, kv_heads, dim)
        q_stride, out_stride = _token_stride(q, "q", dtype, heads, dim), _token_stride(out, "out", dtype, heads, dim)
        if not (len(k) == len(v) == tokens and len(q) >= n and len(out) >= n):
            raise ValueError(f"k and v must hold the step's {tokens} tokens and q and out its {n} decodes, got "
                             f"{len(k)}, {len(v)}, {len(q)}, {len(out)}.")
        k_cache, v_cache = self._pointers[layer]
        status = _library().microscale_cpu_attention_step(
            k.data_ptr(), k_stride, v.data_ptr(), v_stride, slot_blocks, slot_offsets, tokens, q.data_ptr(), q_stride,
            k_cache, v_cache, tables, table_stride, positions, out.data_ptr(), out_stride, n, heads, kv_heads, dim,
            self.block_size, scale, window or 0, None if sinks is None else sinks.data_ptr(), DTYPE_CODES[dtype],
            int(self.amx), torch.get_num_threads(),
        )
        if status:
            raise MemoryError("The CPU attention kernel could not allocate its scores' scratch.")

    def _check_heads(self, heads: int, sinks: torch.Tensor | None) -> None:
        if heads % self.kv_heads:
            raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({self.kv_heads}).")
        if sinks is not None and (sinks.dtype != torch.float32 or sinks.shape != (heads,) or not sinks.is_contiguous()):
            raise ValueError(f"sinks must be float32 [{heads}].")

    def prefill_applies(self, context_start: int, query_len: int) -> bool:
        """Whether `prefill` is the faster way to attend this chunk: always after cached tokens (SDPA then needs a
        gathered copy and a mask), and for a fresh chunk unless its heads are large and it is long, where torch's
        own causal kernel wins (0.93x at 1024 queries of 128 dimensions, 0.77x at 2048; 1.1-2.3x up to 512
        queries, benchmarks/cpu_kernels.py)."""
        return self.amx_prefill and (context_start > 0 or self.head_dim < LONG_CHUNK_HEAD_DIM
                                     or query_len <= LONG_CHUNK_QUERIES)

    def prefill(self, layer: int, q: torch.Tensor, out: torch.Tensor, block_table: torch.Tensor,
                context_start: int, scale: float, window: int | None, sinks: torch.Tensor | None) -> None:
        """out = causal attention of one prefill chunk's queries q [query_len, heads, head_dim] (positions
        context_start onwards) over its sequence's keys 0..context_start + query_len - 1 in layer `layer`'s cache,
        through block_table (int64 [blocks]): the chunk's own keys must be in the cache already (this step's
        __call__ for the layer writes them). Only where `amx_prefill` is True."""
        if not self.amx_prefill:
            raise RuntimeError("CpuAttention.prefill needs bfloat16 caches, a head size that is a multiple of 32 "
                               "and a CPU with AMX.")
        heads, query_len = q.shape[1], q.shape[0]
        self._check_heads(heads, sinks)
        q_stride = _token_stride(q, "q", self.dtype, heads, self.head_dim)
        out_stride = _token_stride(out, "out", self.dtype, heads, self.head_dim)
        length = context_start + query_len
        if len(out) != query_len or block_table.dim() != 1 or len(block_table) * self.block_size < length:
            raise ValueError(f"out must hold the chunk's {query_len} queries and block_table cover its {length} "
                             f"keys, got {len(out)} rows and {tuple(block_table.shape)} blocks.")
        table = _index(block_table, "block_table")
        k_cache, v_cache = self._pointers[layer]
        status = _prefill_library().microscale_cpu_prefill_attention(
            q.data_ptr(), q_stride, k_cache, v_cache, table.data_ptr(), context_start, query_len, out.data_ptr(),
            out_stride, heads, self.kv_heads, self.head_dim, self.block_size, scale, window or 0,
            None if sinks is None else sinks.data_ptr(), torch.get_num_threads(),
        )
        if status:
            raise MemoryError(f"The CPU prefill attention kernel could not allocate the packed keys and values of "
                              f"{length} tokens.")


def _library() -> ctypes.CDLL:
    return loaded_library(_load(), "The CPU attention kernel")


def _prefill_library() -> ctypes.CDLL:
    return loaded_library(_load_prefill(), "The CPU prefill attention kernel")
