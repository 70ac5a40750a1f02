"""Decode steps replayed from CUDA graphs, captured once at start-up for bucketed batch sizes (1, 2, 4, 8,
16, 32, 48, 64, ... up to max_num_seqs). A step of n decodes and no prefill runs the smallest bucket >= n,
padded; anything else (prefill chunks, more decodes than the largest bucket) runs eagerly.

At small batches a decode step is a few hundred short kernel launches; a replay is one. The decode path is
graph-safe with the Triton backend: its kernels take block tables and context lengths as tensors, split-K is
fixed at capture, and nothing in the forward reads a value back to the host. Padded rows write their keys
and values into a scratch block that no sequence owns, and attend over one key there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from microscale.attention.metadata import AttentionMetadata, DecodeBatch

logger = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two up to 32, then steps of 16 (vLLM's spacing), always ending at max_batch."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_batch]
    sizes += list(range(48, max_batch, 16))
    return sizes + [max_batch]


class Graph(Protocol):
    def replay(self) -> torch.Tensor: ...


class CudaGraph:
    """fn captured into a CUDA graph after one warm-up run on a side stream (Triton compiles there)."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool: object) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class EagerReplay:
    """Runs fn again on the same static buffers: what a replay computes, without CUDA (tests on CPU check the
    buffers, padding and buckets with it)."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool: object) -> None:
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class DecodeGraphs:
    def __init__(
        self, model: nn.Module, max_batch: int, max_model_len: int, block_size: int, kv_heads: int,
        scratch_block: int, device: torch.device, graph_type: type = CudaGraph,
    ) -> None:
        self.model = model
        self.buckets = bucket_sizes(max_batch)
        self.max_model_len = max_model_len
        self.scratch_block = scratch_block
        self.kv_heads = kv_heads
        max_blocks = -(-max_model_len // block_size)

        def buffer(*shape: int, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=torch.int64, device=device)

        # Static inputs: each replay reads them where they were at capture.
        self.input_ids = buffer(max_batch)
        self.positions = buffer(max_batch)
        self.slot_blocks = buffer(max_batch, fill=scratch_block)
        self.slot_offsets = buffer(max_batch)
        self.block_tables = buffer(max_batch, max_blocks, fill=scratch_block)
        self.context_lens = buffer(max_batch, fill=1)
        self.graph_type = graph_type
        self.graphs: dict[int, Graph] = {}

    def capture(self) -> float:
        """Capture every bucket, largest first (smaller graphs reuse its memory pool); returns the seconds."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.graph_type is CudaGraph else None
        for size in reversed(self.buckets):
            meta = self._metadata(size)
            self.graphs[size] = self.graph_type(
                lambda size=size, meta=meta: self.model(self.input_ids[:size], self.positions[:size], meta), pool
            )
        elapsed = time.perf_counter() - started
        logger.info("captured %d decode graphs (batch %s) in %.1fs", len(self.graphs), self.buckets, elapsed)
        return elapsed

    def _metadata(self, size: int) -> AttentionMetadata:
        from microscale.kernels.decode_attention import choose_num_splits  # imports triton: only when capturing

        # The split count is part of the graph: sized for the longest context a replay may see.
        decode = DecodeBatch(
            size=size, positions=self.positions[:size], length=self.max_model_len,
            block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
            num_splits=choose_num_splits(self.max_model_len, size, self.kv_heads),
        )
        return AttentionMetadata(self.slot_blocks[:size], self.slot_offsets[:size], decode, [])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """The hidden states of a decode-only step by replay, or None when it must run eagerly."""
        decode = meta.decode
        if meta.prefills or decode is None or decode.size > self.buckets[-1]:
            return None
        n = decode.size
        size = next(b for b in self.buckets if b >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_blocks[:n] = meta.slot_blocks
        self.slot_offsets[:n] = meta.slot_offsets
        tables = decode.paged_block_tables()
        self.block_tables[:n, :tables.shape[1]] = tables
        self.context_lens[:n] = decode.context_lens
        # Rows n..size-1 may hold an earlier step's sequences: point them back at the scratch block, one key
        # long. (Table columns past a row's context are never read.)
        self.slot_blocks[n:size] = self.scratch_block
        self.block_tables[n:size] = self.scratch_block
        self.context_lens[n:size] = 1
        self.positions[n:size] = 0
        return self.graphs[size].replay()[:n]
