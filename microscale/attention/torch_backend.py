"""Reference attention over the paged KV cache, in plain torch. Runs on CPU and GPU; faster backends
(Triton) must match it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from microscale.attention.decode_buffer import DecodeBuffer
from microscale.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from microscale.distributed.parallel_state import tp_size
from microscale.kernels.cpu_attention import CpuAttention, cpu_attention_unavailable_reason
from microscale.quant.kv_cache import KVCache, UnquantizedKVCache

logger = logging.getLogger(__name__)


@dataclass
class _BufferRows:
    """Where this step's decodes sit in the decode buffer."""

    decode: DecodeBatch  # the step's decodes, in the flat batch's order
    rows: torch.Tensor  # [n] the row of each
    order: torch.Tensor | None  # [n] the decode in each row 0..n-1; None: decode i is in row i
    in_row_order: DecodeBatch  # their positions in row order, over the longest context (masks shared by layers)


class TorchAttentionBackend:
    name = "torch"
    # On a CPU, a cache of the model dtype is written and its decodes attended by the C kernel on the paged blocks
    # in place (kernels/cpu_attention.py), and bfloat16 prefill chunks on AMX read those blocks too; decodes over a
    # quantised cache read a contiguous copy of each context (attention/decode_buffer.py) when it fits, whose rows
    # are assigned on the host every step.
    graph_safe = False

    def __init__(self, cpu_kernel: bool = True) -> None:
        """cpu_kernel=False: torch ops only, on every device (the kernel's reference)."""
        self.use_cpu_kernel = cpu_kernel
        self.cpu_attention: CpuAttention | None = None
        self._cpu_step: AttentionMetadata | None = None  # the step cpu_attention was last given
        self.decode_buffer: DecodeBuffer | None = None
        self._kv_caches: list[KVCache] = []
        self._block_size = 0
        self._rows: _BufferRows | None = None

    @staticmethod
    def unavailable_reason(device: torch.device) -> str | None:
        return None  # works everywhere

    def bind_kv_caches(
        self, kv_caches: list[KVCache], num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int
    ) -> None:
        self._kv_caches, self._block_size = list(kv_caches), block_size
        # The C kernel reads a cache of the model dtype where it lies.
        first = kv_caches[0]
        if not self.use_cpu_kernel:
            kernel_reason = "turned off (cpu_kernel=False)"
        elif not isinstance(first, UnquantizedKVCache):
            kernel_reason = "the KV cache is quantised"
        else:
            kernel_reason = cpu_attention_unavailable_reason(first.device, first.dtype, first.head_dim)
        self.cpu_attention = self._cpu_step = None
        if kernel_reason is None:
            operands = [kv.kernel_operands() for kv in kv_caches]
            self.cpu_attention = CpuAttention([(layer.keys, layer.values) for layer in operands])
        # Otherwise the decode buffer, which pads every row to the longest context: only where it can never
        # outgrow the paged cache's tokens, and only on CPU (a GPU's memory is already given to the paged cache);
        # else decodes read the paged blocks. It holds the model dtype, so beside a quantised cache it may take
        # more bytes than the cache itself. Off under tensor parallelism: every rank decodes from paged blocks.
        fits = max_num_seqs * max_model_len <= num_blocks * block_size
        self.decode_buffer = None
        if self.cpu_attention is None and fits and first.device.type == "cpu" and tp_size() == 1:
            self.decode_buffer = DecodeBuffer(len(kv_caches), max_num_seqs, first.kv_heads, first.head_dim,
                                              max_model_len, first.dtype, first.device)
        if self.cpu_attention is not None:
            logger.info("attention: the CPU kernel writes the cache and attends decodes over its blocks in place")
        else:
            source = "the persistent decode buffer" if self.decode_buffer else "paged blocks"
            logger.info("decode attention reads %s%s", source,
                        f" (CPU kernel: {kernel_reason})" if first.device.type == "cpu" else "")

    def kv_cache_changed(self) -> None:
        if self.decode_buffer is not None:
            self.decode_buffer.drop_rows()  # they hold values read with the old scales

    def prepare(self, meta: AttentionMetadata) -> None:
        """Give this step's decodes their rows in the decode buffer (filled from the paged cache when new). A
        sequence swapped back in skipped a step, so its row was dropped and is refilled from its blocks."""
        self._rows = None
        decode = meta.decode
        if self.decode_buffer is None or decode is None:
            return
        rows = self.decode_buffer.assign(decode.sequences, self._kv_caches, self._block_size)
        device = decode.positions.device
        order, positions = None, decode.positions
        if rows != list(range(decode.size)):
            order = torch.tensor(sorted(range(decode.size), key=rows.__getitem__), device=device)
            positions = positions[order]
        self._rows = _BufferRows(decode, torch.tensor(rows, device=device), order,
                                 DecodeBatch(decode.size, positions, decode.length))

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
        layer_index: int,
        sinks: torch.Tensor | None = None,  # [num_heads] float32: a learned extra logit per head (gpt-oss)
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        if self.cpu_attention is not None:
            # Writes the step's keys/values (stored as they are: the cache holds the model dtype) and attends the
            # decodes; prefill chunks below read the written cache. The step's index tensors are bound once, at
            # its first layer.
            if self._cpu_step is not meta:
                decode = meta.decode
                self.cpu_attention.set_step(meta.slot_blocks, meta.slot_offsets,
                                            None if decode is None else decode.paged_block_tables(),
                                            None if decode is None else decode.positions)
                self._cpu_step = meta
            self.cpu_attention(layer_index, q, k, v, out, scale, window, sinks)
        else:
            # From here on the new keys/values are read as the cache holds them (dequantised, if it quantises), so
            # reading them directly or from the cache gives the same result.
            k, v = kv_cache.write(k, v, meta.slot_blocks, meta.slot_offsets)
            if meta.decode is not None:
                n = meta.decode.size
                if self._rows is not None and self._rows.decode is meta.decode:
                    out[:n] = self._decode_from_buffer(q[:n], k[:n], v[:n], layer_index, scale, window, sinks)
                else:
                    out[:n] = self._decode(q[:n], k[:n], v[:n], kv_cache, meta.decode, scale, window, sinks)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
            if self.cpu_attention is not None and self.cpu_attention.prefill_applies(chunk.context_start,
                                                                                     chunk.query_len):
                self.cpu_attention.prefill(layer_index, q[rows], out[rows], chunk.block_table, chunk.context_start,
                                           scale, window, sinks)
            else:
                out[rows] = self._prefill(q[rows], k[rows], v[rows], kv_cache, chunk, scale, window, sinks)
        return out.flatten(1)

    def _decode_from_buffer(self, q, k, v, layer_index: int, scale: float, window: int | None, sinks):
        placed = self._rows
        n = placed.decode.size
        keys, values = self.decode_buffer.k[layer_index], self.decode_buffer.v[layer_index]
        keys[placed.rows, :, placed.decode.positions] = k
        values[placed.rows, :, placed.decode.positions] = v
        if placed.order is not None:
            q = q[placed.order]
        # Rows 0..n-1 cut at this step's longest context (the buffer's rows are as long as the longest context
        # it has held): both paths read the strided view in place, 2x faster at 300 of 768 positions.
        length = placed.in_row_order.length
        keys, values = keys[:n, :, :length], values[:n, :, :length]
        mask = placed.in_row_order.mask(window)
        if sinks is None and q.dtype != torch.float32:
            # In 16-bit types torch's fused CPU kernel is 1.2-3x faster than the two matmuls at 1-32 rows (torch
            # 2.13; in float32 they are on par).
            out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale,
                                                 enable_gqa=q.shape[1] != keys.shape[1])[:, :, 0]
        else:
            out = _grouped_attention(q[:, :, None], keys, values, mask, scale, sinks)[:, :, 0]
        return out if placed.order is None else out[placed.rows]

    @staticmethod
    def _decode(q, k, v, kv_cache, batch: DecodeBatch, scale: float, window: int | None, sinks):
        # Each gather gives [n * max_blocks, block_size, kv_heads, dim], viewed as [n, kv_heads, L, dim].
        keys, values = kv_cache.read(batch.paged_block_tables().flatten())
        shape = (batch.size, -1, *keys.shape[2:])
        keys = keys.view(shape).transpose(1, 2)[:, :, : batch.length]
        values = values.view(shape).transpose(1, 2)[:, :, : batch.length]
        return _grouped_attention(q[:, :, None], keys, values, batch.mask(window), scale, sinks)[:, :, 0]

    @staticmethod
    def _prefill(q, k, v, kv_cache, chunk: PrefillChunk, scale: float, window: int | None, sinks) -> torch.Tensor:
        heads, kv_heads = q.shape[1], k.shape[1]
        gqa = heads != kv_heads
        # SDPA's fused CPU kernel takes 4-D [batch, heads, tokens, dim] only: 3-D inputs fall back to its
        # unfused "math" path (4-5x slower for a 300-token chunk).
        qt = q.transpose(0, 1)[None]
        if chunk.context_start == 0 and window is None and sinks is None:
            # Nothing cached before this chunk: attend to the new keys directly, plain causal.
            out = F.scaled_dot_product_attention(
                qt, k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=gqa
            )
            return out[0].transpose(0, 1)
        length = chunk.context_len
        keys, values = kv_cache.read(chunk.block_table)
        keys = keys.flatten(0, 1)[:length].transpose(0, 1)
        values = values.flatten(0, 1)[:length].transpose(0, 1)
        q_pos = torch.arange(chunk.context_start, length, device=q.device)[:, None]
        k_pos = torch.arange(length, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        if sinks is None:
            out = F.scaled_dot_product_attention(qt, keys[None], values[None], attn_mask=mask, scale=scale,
                                                 enable_gqa=gqa)
            return out[0].transpose(0, 1)
        # SDPA has no sink term: the explicit path, a block of queries at a time to bound the score matrix.
        out = torch.empty_like(q)
        rows = max(1, _MAX_SCORES // (heads * length))
        group = heads // kv_heads
        for start in range(0, q.shape[0], rows):
            part = slice(start, start + rows)
            # Scores rows are ordered (query head in its group, query): the mask repeats once per group head.
            part_mask = mask[part].repeat(group, 1)[None, None]
            out[part] = _grouped_attention(
                q[None, part].transpose(1, 2), keys[None], values[None], part_mask, scale, sinks
            )[0].transpose(0, 1)
        return out


_MAX_SCORES = 1 << 24  # float32 attention scores held at once by the explicit prefill path (64 MiB)


def _grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention as two batched matmuls over contiguous per-sequence keys, the query heads of one KV head side
    by side (no K/V repeat), softmax in float32. q: [n, heads, queries, dim]; keys/values: [n, kv_heads, L,
    dim]; mask broadcasts to [n, kv_heads, group * queries, L]. With `sinks`, each head's softmax denominator
    has one more term exp(sink): attention mass that goes nowhere. For float32 decode on CPU it is on par with
    torch's fused SDPA with a mask (torch 2.13)."""
    n, heads, queries, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    grouped = q.reshape(n, kv_heads, group * queries, dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = scores.softmax(dim=-1)
    else:
        sink = sinks.float().view(1, kv_heads, group, 1, 1).expand(-1, -1, -1, queries, -1)
        sink = sink.reshape(1, kv_heads, group * queries, 1)
        top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
        weights = (scores - top).exp()
        probs = weights / (weights.sum(dim=-1, keepdim=True) + (sink - top).exp())
    return torch.matmul(probs.to(q.dtype), values).view(n, heads, queries, dim)
