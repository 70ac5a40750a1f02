"""KV cache storage: one attention layer's paged keys and values, quantised on write and dequantised to the
model dtype on read. Schemes register by name (`kv_cache_quant`):

- "none": the model dtype, stored as is.
- "int8": symmetric int8. Dynamic by default: a scale per token and KV head (amax / 127 of that head's vector),
  computed as tokens are written and stored beside the cache. Static once `set_scales` gives one scale per KV
  head (from calibration): then no per-token scales are stored.
- "fp8": E4M3 with one scale for the layer's keys and one for its values, 1.0 unless calibrated.

Layout: [2 (key, value), num_blocks, block_size, kv_heads, head_dim]: a gather of whole blocks from one half is
contiguous, so a sequence's gathered keys view as one sequence without another copy.

Preemption by swapping copies whole blocks, as stored (scales included), to a host mirror of the cache and back:
the restored blocks are bit-identical to the swapped-out ones.

`write` returns the new tokens as the cache now holds them, dequantised by the same formula as `read`: attention
that reads new tokens directly (decode buffer rows, a prefill with nothing cached) sees exactly the values a
later read of the cache gives, so every path computes the same result.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from microscale.quant import fp8
from microscale.quant.registry import Registry

INT8_MAX = 127
_FP8 = getattr(torch, "float8_e4m3fn", None)
# Per-token int8 scales in bfloat16: half the bytes of float32, and rounding amax / 127 to the nearest bfloat16
# (relative error <= 2^-8) keeps |x| / scale <= 127.5, so the round trip still errs by at most scale / 2.
TOKEN_SCALE_DTYPE = torch.bfloat16
_REQUANTIZE_BLOCKS = 256  # blocks re-quantised at once when static scales change under a filled cache

KV_CACHES: Registry[type[KVCache]] = Registry("kv_cache_quant")
register_kv_cache = KV_CACHES.register
known_kv_cache_quants = KV_CACHES.names


def make_kv_cache(
    name: str | None, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> KVCache:
    """An unallocated KV cache of scheme `name` (None: the model dtype) for one layer."""
    return KV_CACHES.get(name)(kv_heads, head_dim, dtype, device)


def kv_scales_from_amax(
    scheme: str, k_amax: torch.Tensor, v_amax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static scales from calibration's largest |k| and |v| per KV head ([kv_heads] each): per head for int8
    (amax / 127), one per tensor for fp8 (max over heads / 448)."""
    known = quantized_kv_cache_names()
    if scheme not in known:
        raise ValueError(f"KV cache scheme {scheme!r} has no scales; known: {known}.")
    cls = KV_CACHES.get(scheme)
    return cls.scales_from_amax(k_amax.float()), cls.scales_from_amax(v_amax.float())


def quantized_kv_cache_names() -> list[str]:
    """The schemes that quantize (every one but the model dtype's)."""
    return [name for name in KV_CACHES.names() if issubclass(KV_CACHES.get(name), QuantizedKVCache)]


# ---- the formulas ------------------------------------------------------------------------------------------
# A scale broadcasts over x's leading dims and applies to its whole last (head_dim) dim: [..., kv_heads] per
# token and head, [kv_heads] per head, or [] per tensor.


def int8_token_scales(x: torch.Tensor) -> torch.Tensor:
    """Dynamic scales of x [..., kv_heads, head_dim]: amax over head_dim / 127; an all-zero vector gets 1."""
    amax = x.abs().amax(dim=-1).float()
    return torch.where(amax > 0, amax / INT8_MAX, 1.0).to(TOKEN_SCALE_DTYPE)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale.float()[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return fp8.quantize_fp8(x, scale.float()[..., None])


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


@dataclass
class KernelKV:
    """One layer's cache as kernels take it. keys/values: [num_blocks, block_size, kv_heads, head_dim] as
    stored (model dtype, int8 or float8_e4m3fn). Scales: None (not quantised) or [num_blocks, block_size,
    kv_heads] (float32 or bfloat16, possibly a zero-stride view): a slot's value is stored.float() * scale."""

    keys: torch.Tensor
    values: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    # The scales are per-token storage that a write fills (int8 without static scales).
    dynamic_int8: bool = False


def _slot_view(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if scale.dim() == 3:
        return scale
    return scale.reshape(1, 1, -1).expand(shape)


# ---- storage -----------------------------------------------------------------------------------------------


class KVCache(ABC):
    """One attention layer's keys and values in paged blocks. Built before the engine sizes the cache (so
    `bytes_per_token` can count it), then `allocate`d once."""

    storage_dtype: torch.dtype | None = None  # None: the model dtype
    # Its static scales are the ones pre-quantized checkpoints carry (compressed-tensors' per-tensor
    # self_attn.k_scale / v_scale): loaded from them, and written by `microscale quantize`.
    checkpoint_scales: bool = False
    # It stores float8: kernels must convert from FP8, which needs FP8 hardware (sm_89+) in Triton.
    stores_fp8: bool = False

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.data: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads, head_dim]
        self.host: list[torch.Tensor] = []  # swap space: block_tensors() in host memory, num_host_blocks each

    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take, with any per-token scales."""
        itemsize = torch.empty((), dtype=self.storage_dtype or self.dtype).element_size()
        return 2 * self.kv_heads * self.head_dim * itemsize

    def allocate(self, num_blocks: int, block_size: int) -> None:
        # Zeroed: unwritten slots are masked out, but 0 * NaN from uninitialised memory would still poison.
        self.data = torch.zeros(
            2, num_blocks, block_size, self.kv_heads, self.head_dim,
            dtype=self.storage_dtype or self.dtype, device=self.device,
        )

    def block_tensors(self) -> list[torch.Tensor]:
        """Everything stored per slot, each [2 (key, value), num_blocks, block_size, ...]: what a block holds."""
        return [self.data]

    def allocate_host(self, num_blocks: int) -> None:
        """Swap space for `num_blocks` blocks in host memory (pinned beside a GPU, for faster copies)."""
        pin = self.device.type == "cuda"
        self.host = [
            torch.empty((2, num_blocks, *t.shape[2:]), dtype=torch.uint8, pin_memory=pin)
            for t in self._raw_block_tensors()
        ]

    def swap_out(self, blocks: torch.Tensor, host_blocks: torch.Tensor) -> None:
        """Copy device `blocks` into swap-space `host_blocks` (index tensors on the device and on the host)."""
        for stored, host in zip(self._raw_block_tensors(), self.host):
            host[:, host_blocks] = stored[:, blocks].cpu()

    def swap_in(self, host_blocks: torch.Tensor, blocks: torch.Tensor) -> None:
        """Copy swap-space `host_blocks` back into device `blocks`."""
        for stored, host in zip(self._raw_block_tensors(), self.host):
            stored[:, blocks] = host[:, host_blocks].to(self.device)

    def _raw_block_tensors(self) -> list[torch.Tensor]:
        # Copied as bytes: bit-exact by construction, and no indexing kernel is needed for float8 on a device.
        return [t.view(torch.uint8) for t in self.block_tensors()]

    @abstractmethod
    def write(
        self, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens' keys and values [T, kv_heads, head_dim] in slots (blocks[i], offsets[i]); returns
        them as the cache now holds them, in the model dtype."""

    @abstractmethod
    def read(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks: [len(blocks), block_size, kv_heads, head_dim], model dtype."""

    @abstractmethod
    def describe(self) -> str:
        """What one value is stored as, for the log."""

    def set_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        raise ValueError("The KV cache is not quantised (kv_cache_quant=None): it has no scales to set.")

    def kernel_operands(self) -> KernelKV:
        """What attention kernels read: the stored keys and values, and their dequantisation scales."""
        return KernelKV(self.data[0], self.data[1], None, None)


@register_kv_cache("none")
class UnquantizedKVCache(KVCache):
    def write(self, k, v, blocks, offsets):
        self.data[0].index_put_((blocks, offsets), k)
        self.data[1].index_put_((blocks, offsets), v)
        return k, v

    def read(self, blocks):
        return self.data[0].index_select(0, blocks), self.data[1].index_select(0, blocks)

    def describe(self) -> str:
        return str(self.dtype).removeprefix("torch.")


class QuantizedKVCache(KVCache):
    """Stores quantise(x / scale), reads back q * scale. `static_scales` ([2 (key, value), *static_shape]
    float32) apply unless a scheme computes per-token scales."""

    static_shape: tuple[int, ...] = ()

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(kv_heads, head_dim, dtype, device)
        self.static_scales: torch.Tensor | None = None

    @staticmethod
    @abstractmethod
    def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
        """A static scale from the largest |x| seen per KV head."""

    @abstractmethod
    def _quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...

    def _write_scales(self, half: int, x: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The scales new tokens are quantised with (a scheme with per-token scales also stores them)."""
        return self.static_scales[half]

    def _read_scales(self, half: int, blocks: torch.Tensor) -> torch.Tensor:
        return self.static_scales[half]

    def _slot_scales(self, half: int) -> torch.Tensor:
        """The scales of every slot: [num_blocks, block_size, kv_heads], or static ones that broadcast to it."""
        return self.static_scales[half]

    def write(self, k, v, blocks, offsets):
        stored = []
        for half, x in enumerate((k, v)):
            scale = self._write_scales(half, x, blocks, offsets)
            q = self._quantize(x, scale)
            self.data[half].index_put_((blocks, offsets), q)
            stored.append(dequantize(q, scale, self.dtype))
        return stored[0], stored[1]

    def read(self, blocks):
        k, v = (
            dequantize(self.data[half].index_select(0, blocks), self._read_scales(half, blocks), self.dtype)
            for half in (0, 1)
        )
        return k, v

    def kernel_operands(self) -> KernelKV:
        shape = self.data.shape[1:4]
        k_scale, v_scale = (self._slot_scales(half) for half in (0, 1))
        # Per-head [kv_heads] or per-tensor [] scales broadcast to every slot as zero-stride views.
        return KernelKV(self.data[0], self.data[1], _slot_view(k_scale, shape), _slot_view(v_scale, shape))

    def set_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Static scales (float32, `static_shape`). Tokens the cache already holds are re-quantised with them,
        so reads stay consistent whenever this is called (e.g. by calibration on a running engine)."""
        scales = []
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            scale = scale.detach().to(self.device, torch.float32)
            if scale.numel() != math.prod(self.static_shape):
                raise ValueError(f"{type(self).__name__} takes a {name} of shape {self.static_shape}, got "
                                 f"{tuple(scale.shape)}.")
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise ValueError(f"{name} must be positive and finite, got {scale.tolist()}.")
            scales.append(scale.reshape(self.static_shape))
        if self.data is None:
            self._use_static(torch.stack(scales))
            return
        # `before` keeps the old scale tensors (_use_static rebinds, never writes into them) and shares `data`,
        # which is rewritten a slice of blocks at a time.
        before = copy.copy(self)
        self._use_static(torch.stack(scales))
        num_blocks, block_size = self.data.shape[1:3]
        offsets = torch.arange(block_size, device=self.device)
        for start in range(0, num_blocks, _REQUANTIZE_BLOCKS):
            blocks = torch.arange(start, min(start + _REQUANTIZE_BLOCKS, num_blocks), device=self.device)
            k, v = before.read(blocks)
            slots = blocks.repeat_interleave(block_size), offsets.repeat(len(blocks))
            self.write(k.flatten(0, 1), v.flatten(0, 1), *slots)
        if self.host:  # the swap space takes the new layout; swapped-out blocks are not re-quantised
            self.allocate_host(self.host[0].shape[1])

    def _use_static(self, scales: torch.Tensor) -> None:
        self.static_scales = scales


@register_kv_cache("int8")
class Int8KVCache(QuantizedKVCache):
    storage_dtype = torch.int8

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(kv_heads, head_dim, dtype, device)
        self.static_shape = (kv_heads,)
        self.token_scales: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads] while dynamic

    @staticmethod
    def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
        return torch.where(amax > 0, amax / INT8_MAX, 1.0)

    @property
    def dynamic(self) -> bool:
        return self.static_scales is None

    def bytes_per_token(self) -> int:
        scales = 2 * self.kv_heads * TOKEN_SCALE_DTYPE.itemsize if self.dynamic else 0
        return super().bytes_per_token() + scales

    def allocate(self, num_blocks: int, block_size: int) -> None:
        super().allocate(num_blocks, block_size)
        if self.dynamic:
            self.token_scales = torch.zeros(
                2, num_blocks, block_size, self.kv_heads, dtype=TOKEN_SCALE_DTYPE, device=self.device
            )

    def block_tensors(self) -> list[torch.Tensor]:
        return super().block_tensors() + ([self.token_scales] if self.dynamic else [])

    def _quantize(self, x, scale):
        return quantize_int8(x, scale)

    def _write_scales(self, half, x, blocks, offsets):
        if not self.dynamic:
            return super()._write_scales(half, x, blocks, offsets)
        scale = int8_token_scales(x)
        self.token_scales[half].index_put_((blocks, offsets), scale)
        return scale

    def _read_scales(self, half, blocks):
        if not self.dynamic:
            return super()._read_scales(half, blocks)
        return self.token_scales[half].index_select(0, blocks)

    def _slot_scales(self, half):
        return super()._slot_scales(half) if not self.dynamic else self.token_scales[half]

    def kernel_operands(self) -> KernelKV:
        return dataclasses.replace(super().kernel_operands(), dynamic_int8=self.dynamic)

    def _use_static(self, scales: torch.Tensor) -> None:
        super()._use_static(scales)
        self.token_scales = None

    def describe(self) -> str:
        return "int8, per-token scales" if self.dynamic else "int8, per-head scales"


@register_kv_cache("fp8")
class Fp8KVCache(QuantizedKVCache):
    storage_dtype = _FP8
    checkpoint_scales = True
    stores_fp8 = True

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        if _FP8 is None:
            raise RuntimeError(f"kv_cache_quant='fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} "
                               "lacks; use kv_cache_quant='int8'.")
        try:
            torch.zeros(1, dtype=_FP8, device=device)
        except (RuntimeError, TypeError) as error:
            raise RuntimeError(f"kv_cache_quant='fp8' needs float8 tensors on {device}: {error}") from error
        super().__init__(kv_heads, head_dim, dtype, device)
        self.static_scales = torch.ones(2, device=device)

    @staticmethod
    def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
        top = amax.max()
        return torch.where(top > 0, top / fp8.FP8_MAX, 1.0)

    def _quantize(self, x, scale):
        return quantize_fp8(x, scale)

    def describe(self) -> str:
        return "fp8 e4m3, per-tensor scales"
