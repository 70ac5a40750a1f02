"""Turns a scheduled step into one flat batch of tensors, runs the model once, and returns the logits of
the sequences that sample a token this step.

The tensor-parallel seam lives here: a rank runs the same `execute` on its shard of the model, and only
the sampled ids leave the device.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from microscale.attention.decode_buffer import DecodeBuffer
from microscale.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from microscale.attention.selector import select_attention_backend
from microscale.config import ModelConfig
from microscale.distributed.parallel_state import tp_size
from microscale.engine.cuda_graphs import CudaGraph, DecodeGraphs
from microscale.engine.scheduler import ScheduledChunk
from microscale.layers.attention import Attention
from microscale.layers.moe import FusedMoE
from microscale.quant.kv_cache import make_kv_cache

if TYPE_CHECKING:
    from microscale.distributed.workers import Workers

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self, model: nn.Module, config: ModelConfig, device: torch.device, dtype: torch.dtype, max_num_seqs: int,
        max_model_len: int, kv_cache_quant: str | None = None, kernel_backend: str = "auto",
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.dtype = dtype
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.attention_backend = backend = select_attention_backend(device, kernel_backend)
        # Norms, activations, quantized matmuls and MoE follow the attention backend's kernel family.
        for module in model.modules():
            if hasattr(module, "select_kernels"):
                module.select_kernels(backend.name, device)
        # One cache per layer, in layer order; storage comes with allocate_kv_cache, once the engine has sized it.
        self.kv_caches = [  # this rank's KV heads under tensor parallelism
            make_kv_cache(kv_cache_quant, layer.num_kv_heads, layer.head_dim, dtype, device)
            for layer in self.attention_layers
        ]
        for layer, cache in zip(self.attention_layers, self.kv_caches):
            layer.backend = backend
            layer.kv_cache = cache
        self.block_size = 0
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.decode_buffer: DecodeBuffer | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.workers: Workers | None = None  # rank 0 under tensor parallelism (set by the engine)
        self.scratch_block = 0

    def kv_block_bytes(self, block_size: int) -> int:
        """Bytes one block of `block_size` tokens takes across all layers (keys and values as stored, with any
        per-token scales)."""
        return block_size * sum(cache.bytes_per_token() for cache in self.kv_caches)

    def kv_cache_description(self) -> str:
        """What the paged KV cache stores, for the log: e.g. "bfloat16" or "int8, per-token scales"."""
        return "; ".join(sorted({cache.describe() for cache in self.kv_caches}))

    def set_kv_scales(self, layer_index: int, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        """Static KV cache scales of one layer (float32; from calibration or the checkpoint): [kv_heads] for
        int8 (the layer then stores no per-token scales), [] or [1] for fp8. Before allocate_kv_cache, the
        memory saved goes to more blocks; later, what the cache already holds is re-quantised."""
        self.kv_caches[layer_index].set_scales(k_scale, v_scale)
        if self.decode_buffer is not None:
            self.decode_buffer.drop_rows()  # they hold values read with the old scales

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """num_blocks for the block manager; paged kernels get one more, a scratch block no sequence owns
        (padded rows of CUDA-graph decode steps write there)."""
        cfg = self.config
        self.scratch_block = num_blocks
        for cache in self.kv_caches:
            cache.allocate(num_blocks + (0 if self.attention_backend.uses_decode_buffer else 1), block_size)
        self.block_size = block_size
        # The persistent decode buffer pads every row to the longest context: use it only where it can never
        # outgrow the paged cache's tokens, and only on CPU (a GPU's memory is already given to the paged cache,
        # and its attention kernels read blocks in place); otherwise decodes read the paged blocks. It holds the
        # model dtype, so beside a quantised cache it may take more bytes than the cache itself.
        fits = self.max_num_seqs * self.max_model_len <= num_blocks * block_size
        # Under tensor parallelism workers see no sequences to keep rows for: decodes read paged blocks.
        if fits and self.device.type == "cpu" and self.attention_backend.uses_decode_buffer and tp_size() == 1:
            self.decode_buffer = DecodeBuffer(
                cfg.num_hidden_layers, self.max_num_seqs, cfg.num_key_value_heads, cfg.head_dim, self.max_model_len,
                self.dtype, self.device,
            )
        source = "the persistent decode buffer" if self.decode_buffer else "paged blocks"
        logger.info("decode attention reads %s", source)

    def prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[ScheduledChunk]]:
        """Flat inputs (decodes first, then prefill chunks), metadata, the rows whose logits are needed and
        the chunks they belong to."""
        bs = self.block_size
        decodes = [c for c in chunks if c.num_tokens == 1]
        if self.decode_buffer is not None:
            # Decodes in the order of their rows in the persistent decode buffer.
            by_seq = {c.seq.seq_id: c for c in decodes}
            rows = self.decode_buffer.assign([c.seq for c in decodes], self.kv_caches, bs)
            decodes = [by_seq[s.seq_id] for s in rows]
        prefills = [c for c in chunks if c.num_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for c in decodes:
            seq, pos = c.seq, c.seq.num_computed_tokens
            input_ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
        prefill_chunks = []
        for c in prefills:
            seq, start, n = c.seq, c.seq.num_computed_tokens, c.num_tokens
            prefill_chunks.append(
                PrefillChunk(
                    query_start=len(input_ids),
                    query_len=n,
                    context_start=start,
                    block_table=self._tensor(seq.block_table),
                )
            )
            input_ids.extend(seq.token_ids[start : start + n])
            span = range(start, start + n)
            positions.extend(span)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in span)
        slot_tensor = self._tensor(slots)
        meta = AttentionMetadata(
            slot_blocks=slot_tensor // bs,
            slot_offsets=slot_tensor % bs,
            decode=self._decode_batch(decodes, positions[: len(decodes)]),
            prefills=prefill_chunks,
        )
        ordered = decodes + prefills
        sample_rows, sampling, row = [], [], -1
        for c in ordered:
            row += c.num_tokens
            if c.samples:
                sample_rows.append(row)
                sampling.append(c)
        return self._tensor(input_ids), self._tensor(positions), meta, sample_rows, sampling

    def graphs_unavailable_reason(self) -> str | None:
        if tp_size() > 1:
            return "tensor parallel workers run each broadcast step eagerly"
        if self.attention_backend.uses_decode_buffer:
            return f"the {self.attention_backend.name} attention backend is not graph-safe (Triton's is)"
        if any(isinstance(m, FusedMoE) and not m.fused for m in self.model.modules()):
            return "the reference MoE reads expert counts back to the host (the fused MoE kernel does not)"
        return None

    def enable_decode_graphs(self, graph_type: type = CudaGraph) -> float:
        """Capture decode steps at bucketed batch sizes (after allocate_kv_cache); returns the seconds taken."""
        reason = self.graphs_unavailable_reason()
        if reason is not None:
            raise ValueError(f"Decode graphs cannot be used: {reason}.")
        self.decode_graphs = DecodeGraphs(self.model, self.max_num_seqs, self.max_model_len, self.block_size,
                                          self.config.num_key_value_heads, self.scratch_block, self.device, graph_type)
        with torch.inference_mode():
            return self.decode_graphs.capture()

    def execute(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run one step; returns the logits of the sampling chunks, and those chunks in the same order."""
        input_ids, positions, meta, sample_rows, sampling = self.prepare(chunks)
        return self.forward_logits(input_ids, positions, meta, self._tensor(sample_rows)), sampling

    def execute_all_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns the logits of every token of the flat batch (decodes first, then prefill
        chunks), e.g. to score a prompt."""
        input_ids, positions, meta, _, _ = self.prepare(chunks)
        return self.forward_logits(input_ids, positions, meta, None)

    @torch.inference_mode()
    def forward_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """One forward and the logits of `rows` (None: every token). Under tensor parallelism rank 0 first
        broadcasts these inputs, and every rank runs the same forward on its shard (workers discard the logits)."""
        if self.workers is not None:
            self.workers.send(("execute", input_ids, positions, meta, rows))
        try:
            hidden = None if self.decode_graphs is None else self.decode_graphs.run(input_ids, positions, meta)
            if hidden is None:
                hidden = self.model(input_ids, positions, meta)
            return self.model.compute_logits(hidden if rows is None else hidden[rows])
        except RuntimeError as e:
            if self.workers is not None:  # a collective failed: say which rank died
                raise self.workers.failure(e) from e
            raise

    def _decode_batch(self, decodes: list[ScheduledChunk], positions: list[int]) -> DecodeBatch | None:
        if not decodes:
            return None
        batch = DecodeBatch(size=len(decodes), positions=self._tensor(positions), length=max(positions) + 1)
        if self.decode_buffer is not None:
            batch.keys, batch.values = self.decode_buffer.k, self.decode_buffer.v
            batch.length = self.decode_buffer.capacity
        else:
            width = max(len(c.seq.block_table) for c in decodes)
            tables = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in decodes]
            batch.block_tables = self._tensor(tables)
            batch.context_lens = batch.positions + 1
        return batch

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
