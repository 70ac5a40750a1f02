"""KV cache storage: one attention layer's paged keys and values, quantised on write and dequantised to the
model dtype on read. Schemes register by name (`kv_cache_quant`):

- "none": the model dtype, stored as is.
- "int8": symmetric int8. Dynamic by default: a scale per token and KV head (amax / 127 of that head's vector),
  computed as tokens are written and stored beside the cache. Static once `set_scales` gives one scale per KV
  head (from calibration): then no per-token scales are stored.
- "int4": asymmetric 4-bit (TurboMind's quant_policy=4), two values per byte. Dynamic by default: a scale and a
  zero point per token and KV head, from that head's vector: scale = (max - min) / 15, zero = min, code =
  round((x - zero) / scale) in 0..15, value = code * scale + zero. Static once `set_scales` gives one scale per
  KV head (from calibration's amax): the symmetric range [-amax, amax] with a fixed zero point (see
  Int4KVCache).
- "fp8": E4M3 with one scale for the layer's keys and one for its values, 1.0 unless calibrated.

Layout: [2 (key, value), num_blocks, block_size, kv_heads, head_dim] (int4: head_dim / 2 bytes, element 2j in
the low nibble of byte j, 2j + 1 in the high one): a gather of whole blocks from one half is contiguous, so a
sequence's gathered keys view as one sequence without another copy.

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
INT4_MAX = 15  # int4 codes are 0..15
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
    (amax / 127) and int4 (2 amax / 15), one per tensor for fp8 (max over heads / 448)."""
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


# int4's parameters: [..., 2] = (scale, zero point) per vector, applying as value = code * scale + zero.


def int4_token_params(x: torch.Tensor) -> torch.Tensor:
    """Dynamic parameters of x [..., kv_heads, head_dim]: scale (max - min) / 15 and zero point min, each
    rounded to bfloat16; a constant vector gets scale 1 (its values then all come back as the zero point)."""
    lo, hi = x.amin(dim=-1).float(), x.amax(dim=-1).float()
    scale = torch.where(hi > lo, (hi - lo) / INT4_MAX, 1.0)
    return torch.stack((scale, lo), dim=-1).to(TOKEN_SCALE_DTYPE)


def quantize_int4(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Codes round((x - zero) / scale) in 0..15, packed two a byte: [..., head_dim / 2] uint8."""
    scale, zero = params.float()[..., None].unbind(-2)
    codes = torch.round((x.float() - zero) / scale).clamp(0, INT4_MAX).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def dequantize_int4(packed: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    scale, zero = params.float()[..., None].unbind(-2)
    return (codes.float() * scale + zero).to(dtype)


@dataclass
class KernelKV:
    """One layer's cache as kernels take it. keys/values: [num_blocks, block_size, kv_heads, head_dim] as
    stored (model dtype, int8 or float8_e4m3fn; int4: uint8 [..., head_dim / 2], two codes a byte). Scales and
    zero points: None (not quantised; zero points: not int4) or [num_blocks, block_size, kv_heads] (float32 or
    bfloat16, possibly a zero-stride view; an int4 cache's zero points have its scales' strides): a slot's value
    is stored.float() * scale (+ zero)."""

    keys: torch.Tensor
    values: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    # The scales (and zero points) are per-token storage that a write fills (int8 / int4 without static scales).
    dynamic: bool = False
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None


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
    values_per_element: int = 1  # int4: two values a byte

    @property
    def stored_dim(self) -> int:
        """Stored elements per head and token."""
        return self.head_dim // self.values_per_element

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.data: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads, stored_dim]
        self.host: list[torch.Tensor] = []  # swap space: block_tensors() in host memory, num_host_blocks each

    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take, with any per-token scales."""
        itemsize = torch.empty((), dtype=self.storage_dtype or self.dtype).element_size()
        return 2 * self.kv_heads * self.stored_dim * itemsize

    def allocate(self, num_blocks: int, block_size: int) -> None:
        # Zeroed: unwritten slots are masked out, but 0 * NaN from uninitialised memory would still poison.
        self.data = torch.zeros(
            2, num_blocks, block_size, self.kv_heads, self.stored_dim,
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
    """Stores quantise(x, params), reads back dequantise(stored, params). The parameters are scales (int4: a
    scale and a zero point, [..., 2]); static ones come from `static_scales` ([2 (key, value), *static_shape]
    float32) unless a scheme computes them per token."""

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

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize(q, scale, self.dtype)

    def _static_params(self, half: int) -> torch.Tensor:
        """The parameters the static scales give (each a persistent tensor: CUDA graphs keep its address)."""
        return self.static_scales[half]

    def _write_scales(self, half: int, x: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The scales new tokens are quantised with (a scheme with per-token scales also stores them)."""
        return self._static_params(half)

    def _read_scales(self, half: int, blocks: torch.Tensor) -> torch.Tensor:
        return self._static_params(half)

    def _slot_scales(self, half: int) -> torch.Tensor:
        """The scales of every slot: [num_blocks, block_size, kv_heads], or static ones that broadcast to it."""
        return self._static_params(half)

    def write(self, k, v, blocks, offsets):
        stored = []
        for half, x in enumerate((k, v)):
            scale = self._write_scales(half, x, blocks, offsets)
            q = self._quantize(x, scale)
            self.data[half].index_put_((blocks, offsets), q)
            stored.append(self._dequantize(q, scale))
        return stored[0], stored[1]

    def read(self, blocks):
        k, v = (
            self._dequantize(self.data[half].index_select(0, blocks), self._read_scales(half, blocks))
            for half in (0, 1)
        )
        return k, v

    def kernel_operands(self) -> KernelKV:
        shape = self.data.shape[1:4]
        # Per-head [kv_heads] or per-tensor [] scales broadcast to every slot as zero-stride views.
        k_scale, v_scale = (self._slot_scales(half).expand(shape) for half in (0, 1))
        return KernelKV(self.data[0], self.data[1], k_scale, v_scale)

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


class PerTokenScaledKVCache(QuantizedKVCache):
    """Dynamic by default: parameters per token and KV head, computed from each vector as it is written and
    stored beside the cache (`token_scales`); static per-head ones once `set_scales` gives them (then no
    per-token parameters are stored)."""

    # A (token, head)'s parameters: () one scale; (2,) a scale and a zero point.
    token_param_shape: tuple[int, ...] = ()

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(kv_heads, head_dim, dtype, device)
        self.static_shape = (kv_heads,)
        # [2, num_blocks, block_size, kv_heads, *token_param_shape] while dynamic.
        self.token_scales: torch.Tensor | None = None

    @abstractmethod
    def _token_params(self, x: torch.Tensor) -> torch.Tensor:
        """Dynamic parameters of x [T, kv_heads, head_dim]: [T, kv_heads, *token_param_shape]."""

    @property
    def dynamic(self) -> bool:
        return self.static_scales is None

    def bytes_per_token(self) -> int:
        per_head = math.prod(self.token_param_shape) * TOKEN_SCALE_DTYPE.itemsize
        return super().bytes_per_token() + (2 * self.kv_heads * per_head if self.dynamic else 0)

    def allocate(self, num_blocks: int, block_size: int) -> None:
        super().allocate(num_blocks, block_size)
        if self.dynamic:
            self.token_scales = torch.zeros(2, num_blocks, block_size, self.kv_heads, *self.token_param_shape,
                                            dtype=TOKEN_SCALE_DTYPE, device=self.device)

    def block_tensors(self) -> list[torch.Tensor]:
        return super().block_tensors() + ([self.token_scales] if self.dynamic else [])

    def _write_scales(self, half, x, blocks, offsets):
        if not self.dynamic:
            return super()._write_scales(half, x, blocks, offsets)
        scale = self._token_params(x)
        self.token_scales[half].index_put_((blocks, offsets), scale)
        return scale

    def _read_scales(self, half, blocks):
        if not self.dynamic:
            return super()._read_scales(half, blocks)
        return self.token_scales[half].index_select(0, blocks)

    def _slot_scales(self, half):
        return super()._slot_scales(half) if not self.dynamic else self.token_scales[half]

    def kernel_operands(self) -> KernelKV:
        return dataclasses.replace(super().kernel_operands(), dynamic=self.dynamic)

    def _use_static(self, scales: torch.Tensor) -> None:
        super()._use_static(scales)
        self.token_scales = None


@register_kv_cache("int8")
class Int8KVCache(PerTokenScaledKVCache):
    storage_dtype = torch.int8

    @staticmethod
    def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
        return torch.where(amax > 0, amax / INT8_MAX, 1.0)

    def _token_params(self, x):
        return int8_token_scales(x)

    def _quantize(self, x, scale):
        return quantize_int8(x, scale)

    def describe(self) -> str:
        return "int8, per-token scales" if self.dynamic else "int8, per-head scales"


@register_kv_cache("int4")
class Int4KVCache(PerTokenScaledKVCache):
    """Asymmetric 4-bit, two values a byte; parameters (scale, zero point) per token and KV head, in bfloat16
    (TurboMind's layout). Static: calibration records each head's largest |x|, not its min and max, so the
    calibrated variant is symmetric: range [-amax, amax], scale 2 amax / 15 and the zero point fixed at
    -7.5 scale (code 7.5 is x = 0). Static scales are rounded to bfloat16 values like the per-token ones: a
    4-bit code times an 8-bit-mantissa scale, and 7.5 times it, are exact in float32, so code * scale + zero
    rounds once whether or not a compiler fuses it into an FMA, and every path dequantises to the same bits."""

    storage_dtype = torch.uint8
    values_per_element = 2
    token_param_shape = (2,)

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        if head_dim % 2:
            raise ValueError(f"kv_cache_quant='int4' packs two values a byte: head_dim must be even, got {head_dim}.")
        super().__init__(kv_heads, head_dim, dtype, device)
        self.static_params: torch.Tensor | None = None  # [2, kv_heads, 2] (scale, zero) under static scales

    @staticmethod
    def scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
        return torch.where(amax > 0, 2 * amax / INT4_MAX, 1.0)

    def _token_params(self, x):
        return int4_token_params(x)

    def _quantize(self, x, params):
        return quantize_int4(x, params)

    def _dequantize(self, q, params):
        return dequantize_int4(q, params, self.dtype)

    def _static_params(self, half):
        return self.static_params[half]

    def _use_static(self, scales: torch.Tensor) -> None:
        scales = scales.to(TOKEN_SCALE_DTYPE).float()
        super()._use_static(scales)
        self.static_params = torch.stack((scales, -(INT4_MAX / 2) * scales), dim=-1)

    def kernel_operands(self) -> KernelKV:
        shape = (*self.data.shape[1:4], 2)
        k, v = (self._slot_scales(half).expand(shape) for half in (0, 1))
        return KernelKV(self.data[0], self.data[1], k[..., 0], v[..., 0], self.dynamic, k[..., 1], v[..., 1])

    def describe(self) -> str:
        return "int4, per-token scales and zero points" if self.dynamic else "int4, per-head scales"


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
