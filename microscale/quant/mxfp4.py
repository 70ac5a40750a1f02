"""MXFP4 (OCP Microscaling Formats spec v1.0): blocks of 32 FP4 E2M1 values sharing one E8M0 scale.

Storage follows the gpt-oss checkpoints: along the last dimension, each group of 32 consecutive values
becomes 16 bytes of `blocks` (two 4-bit codes per byte, the even element in the LOW nibble) and one byte of
`scales` (the biased exponent s of the scale 2^(s - 127); 0xFF is NaN). An E2M1 code is sign (bit 3), two
exponent bits and one mantissa bit: codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8..15 their negatives.

Conversion (spec section 6.3): X = 2^(floor(log2(amax)) - emax_elem) with emax_elem = 2 for E2M1, then
every V_i / X rounded to E2M1 (round to nearest, ties to even), normal values beyond 6 clamped to +-6.
"""

from __future__ import annotations

import torch

from microscale.kernels.mx_format import MXFP4_BLOCK

_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E8M0_NAN = 0xFF
_PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Blocks converted per step: bounds the float32/int32 temporaries (~8 MiB each) on tensors of ~1e8 values.
_CHUNK_BLOCKS = 1 << 16

# float32 bits >> 22 (sign, exponent, top mantissa bit) of each E2M1 value -> its code; see `_round_to_e2m1`.
_CODE_OF_BITS: dict[torch.device, torch.Tensor] = {}


def _code_of_bits(device: torch.device) -> torch.Tensor:
    lut = _CODE_OF_BITS.get(device)
    if lut is None:
        bits = torch.tensor(_E2M1_VALUES, dtype=torch.float32).view(torch.int32)
        lut = torch.zeros(1024, dtype=torch.uint8)
        lut[(bits >> 22) & 0x3FF] = torch.arange(16, dtype=torch.uint8)
        lut = _CODE_OF_BITS[device] = lut.to(device)
    return lut


def _round_to_e2m1(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) of float32 `q` with |q| < 8: round to nearest, ties to even, saturating at +-6.

    The E2M1 grid has step 0.5 below 2 and one mantissa bit above, i.e. step 2^(max(e, 0) - 1) in the
    binade [2^e, 2^(e+1)). Adding then subtracting M = step * 2^23 makes float32 round |q| at exactly that
    step, with IEEE ties-to-even, which is ties-to-even on the code too (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). Five times faster than a bucketize over the midpoints."""
    a = q.abs()
    magic = (a.view(torch.int32) >> 23).clamp_(min=127).add_(22).bitwise_left_shift_(23).view(torch.float32)
    r = a.add_(magic).sub_(magic).clamp_(max=6.0).copysign_(q)  # 7.x rounds to 8, clamped to 6
    idx = (r.view(torch.int32) >> 22).bitwise_and_(0x3FF)
    return torch.index_select(_code_of_bits(q.device), 0, idx.view(-1)).view(q.shape)


def pack_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `x` (float16/bfloat16/float32, last dim a multiple of 32) to MXFP4 along its last dim.

    Returns (blocks uint8 [*x.shape[:-1], n // 32, 16], scales uint8 [*x.shape[:-1], n // 32]).
    A block of zeros gets scale byte 0 (2^-127): floor(log2(0)) is -inf, clamped to E8M0's lowest exponent,
    as the spec authors' reference (microsoft/microxcaling) does. A block holding a NaN or an Inf gets the
    NaN scale 0xFF and all-zero codes (see the comment in `_pack_rows`).
    """
    if x.dtype not in _PACK_DTYPES:
        raise TypeError(f"pack_mxfp4 takes float16, bfloat16 or float32, not {x.dtype}.")
    if x.dim() == 0 or x.shape[-1] % MXFP4_BLOCK:
        raise ValueError(
            f"pack_mxfp4 needs a last dimension divisible by {MXFP4_BLOCK}; got shape {tuple(x.shape)}."
        )
    groups = x.shape[-1] // MXFP4_BLOCK
    lead = x.shape[:-1]
    flat = x.reshape(-1, MXFP4_BLOCK)  # a view when x is contiguous
    blocks = torch.empty(flat.shape[0], MXFP4_BLOCK // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(flat.shape[0], dtype=torch.uint8, device=x.device)
    for start in range(0, flat.shape[0], _CHUNK_BLOCKS):
        end = min(start + _CHUNK_BLOCKS, flat.shape[0])
        _pack_rows(flat[start:end], blocks[start:end], scales[start:end])
    return blocks.view(*lead, groups, MXFP4_BLOCK // 2), scales.view(*lead, groups)


def _pack_rows(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """x [n, 32] -> blocks [n, 16], scales [n], written in place."""
    x32 = x.float()  # exact for 16-bit inputs; everything below is exact in float32
    amax = x32.abs().amax(dim=1)  # NaN propagates, so a block with a NaN has a NaN amax
    # floor(log2(amax)) is the float32 exponent field minus its bias, so the scale byte is that field - 2
    # (emax of E2M1 is 2). A subnormal or zero amax has field 0: its exponent is below -126, so the clamp to
    # E8M0's lowest exponent (-127, byte 0) applies; the top clamp (127) cannot be reached, as float32's
    # largest exponent field 254 gives byte 252.
    field = (amax.view(torch.int32) >> 23) & 0xFF
    byte = (field - 2).clamp_(min=0)
    # NaN/Inf (field 255). E2M1 has no Inf or NaN encodings (spec 5.3.3, Table 5); E8M0 has no Inf and one
    # NaN, 0xFF (5.4.1, Table 7), and a block whose scale is NaN is NaN in every element. So a NaN input can
    # only be kept as a NaN scale. For Inf the spec is silent: 6.3 clamps only *normal* values beyond the
    # element's max normal. We give it the NaN scale too, as the spec authors' reference does (microxcaling's
    # `_quantize_mx`: log2(Inf) overflows the scale range and becomes NaN) and torchao (pytorch/ao#4725):
    # saturating to +-6 * 2^127 would turn an overflow into a plausible finite weight.
    special = field == 255
    byte = byte.masked_fill_(special, _E8M0_NAN)
    # 1 / X = 2^(127 - byte), a normal float32 (byte <= 252), so q = x / X is exact.
    inv = ((254 - byte).clamp_(min=1) << 23).view(torch.float32).unsqueeze(1)
    q = x32 * inv if x.dtype == torch.float32 else x32.mul_(inv)  # in place only on our own float32 copy
    codes = _round_to_e2m1(q)  # -0.0 keeps its sign (code 8): E2M1 encodes it
    codes.masked_fill_(special.unsqueeze(1), 0)
    codes = codes.view(-1, MXFP4_BLOCK // 2, 2)
    torch.bitwise_or(codes[..., 0], codes[..., 1] << 4, out=blocks)
    scales.copy_(byte)


# (dtype, device) -> [256 * 256] table: entry (s << 8 | byte) holds the byte's two values times 2^(s - 127),
# both stored in one 4-byte (16-bit dtypes) or 8-byte (float32) word, so a block byte dequantises with one
# gather and no multiply. 256 KiB (bfloat16) / 512 KiB (float32): it stays in L2.
_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_WORD = {2: torch.int32, 4: torch.int64}


def _dequant_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    table = _TABLES.get(key)
    if table is None:
        fp4 = torch.tensor(_E2M1_VALUES, dtype=torch.float64)
        byte = torch.arange(256)
        pairs = torch.stack([fp4[byte & 15], fp4[byte >> 4]], dim=-1)  # [256, 2]: low nibble first
        scale = torch.ldexp(torch.ones(256, dtype=torch.float64), torch.arange(256) - 127)
        scale[_E8M0_NAN] = float("nan")
        # float64 products are exact, and each is representable in float32/bfloat16 (subnormals included), so
        # the cast is exact too; float16's narrower range rounds (to 0 / Inf) outside it.
        values = (scale[:, None, None] * pairs[None]).to(dtype).reshape(256 * 256, 2)
        word = _WORD.get(dtype.itemsize)
        table = values.view(word).reshape(-1) if word is not None else values
        table = _TABLES[key] = table.to(device)
    return table


def unpack_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantise MXFP4 `blocks` [..., G, 16] / `scales` [..., G] to [..., G * 32] in `dtype`.

    Exact for float32 and bfloat16 (every E2M1 value times 2^k, k in [-127, 127], is representable in both);
    scale byte 0xFF makes its whole block NaN. `out` (contiguous, of that shape and dtype) is filled instead of
    a new tensor: on the hot path, a fresh multi-MiB result costs more in page faults than the decoding.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype} / {scales.dtype}.")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
            "([..., G, 16] and [..., G])."
        )
    table = _dequant_table(dtype, blocks.device)
    flat_blocks = blocks.reshape(-1, MXFP4_BLOCK // 2)
    flat_scales = scales.reshape(-1, 1)
    n = flat_blocks.shape[0]
    shape = (*scales.shape[:-1], scales.shape[-1] * MXFP4_BLOCK)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape}.")
    result = out
    out = out.view(table.dtype).view(n * (MXFP4_BLOCK // 2), *table.shape[1:])
    # Chunked so the int32 table indices stay cache-sized instead of as large as the output.
    idx = torch.empty(min(n, _CHUNK_BLOCKS), MXFP4_BLOCK // 2, dtype=torch.int32, device=blocks.device)
    for start in range(0, n, _CHUNK_BLOCKS):
        end = min(start + _CHUNK_BLOCKS, n)
        chunk_idx = idx[: end - start]
        torch.add(flat_blocks[start:end], flat_scales[start:end].to(torch.int32) << 8, out=chunk_idx)
        torch.index_select(table, 0, chunk_idx.view(-1), out=out[start * 16 : end * 16])
    return result
