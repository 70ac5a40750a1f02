"""The batch-invariant attention backend (deterministic mode): it computes attention (against the naive
reference), and a query's output is bit-identical whether it is decoded alone, decoded beside longer
sequences, or computed inside a prefill chunk cut anywhere."""

from __future__ import annotations

import pytest
import torch
from test_torch_backend import BLOCK, make_cache, naive_attention, write

from microscale.attention import batch_invariant
from microscale.attention.batch_invariant import BatchInvariantAttentionBackend
from microscale.attention.metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from microscale.attention.selector import select_attention_backend

HEADS, KV_HEADS, DIM = 8, 2, 16
SCALE = DIM**-0.5


class Sequences:
    """Sequences of random keys/values/queries, each with its own blocks in one cache."""

    def __init__(self, lengths: list[int], dtype: torch.dtype, kv_quant: str | None) -> None:
        torch.manual_seed(0)
        self.k = [torch.randn(n, KV_HEADS, DIM).to(dtype) * 2 for n in lengths]
        self.v = [torch.randn(n, KV_HEADS, DIM).to(dtype) for n in lengths]
        self.q = [torch.randn(n, HEADS, DIM).to(dtype) for n in lengths]
        self.tables, next_block = [], 1  # block 0 unused: padded tables point there
        for n in lengths:
            blocks = -(-n // BLOCK)
            self.tables.append(list(range(next_block, next_block + blocks)))
            next_block += blocks
        self.cache = make_cache(kv_quant, KV_HEADS, DIM, dtype, next_block, self.k + self.v)

    def step(self, decodes: list[tuple[int, int]], prefills: list[tuple[int, int, int]], window, sinks):
        """One step: decodes (sequence, position) and prefill chunks (sequence, start, end); everything before
        each query is written to the cache first, as earlier steps would have. Returns the output rows."""
        spans = [(i, p, p + 1) for i, p in decodes] + list(prefills)
        for i, start, _ in spans:
            write(self.cache, self.tables[i], self.k[i][:start], self.v[i][:start], range(start))
        slots = [(i, p) for i, start, end in spans for p in range(start, end)]
        decode = None
        if decodes:
            width = max(len(self.tables[i]) for i, _ in decodes)
            positions = torch.tensor([p for _, p in decodes])
            decode = DecodeBatch(len(decodes), positions, int(positions.max()) + 1,
                                 block_tables=torch.tensor([self.tables[i] + [0] * (width - len(self.tables[i]))
                                                            for i, _ in decodes]),
                                 context_lens=positions + 1)
        chunks, start_row = [], len(decodes)
        for i, start, end in prefills:
            chunks.append(PrefillChunk(start_row, end - start, start, torch.tensor(self.tables[i])))
            start_row += end - start
        meta = AttentionMetadata(
            slot_blocks=torch.tensor([self.tables[i][p // BLOCK] for i, p in slots]),
            slot_offsets=torch.tensor([p % BLOCK for _, p in slots]), decode=decode, prefills=chunks)
        pick = [(self.q, i, p) for i, p in slots]
        q = torch.stack([qs[i][p] for qs, i, p in pick])
        k = torch.stack([self.k[i][p] for i, p in slots])
        v = torch.stack([self.v[i][p] for i, p in slots])
        out = BatchInvariantAttentionBackend().forward(q, k, v, self.cache, meta, SCALE, window, 0, sinks)
        return out.view(len(slots), HEADS, DIM)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("kv_quant", [None, "int8"])
def test_matches_naive_attention(dtype, tol, window, with_sinks, kv_quant):
    seqs = Sequences([70, 9, 1, 80, 30], dtype, kv_quant)
    sinks = torch.randn(HEADS) + 1.0 if with_sinks else None
    out = seqs.step(decodes=[(0, 69), (1, 8), (2, 0)], prefills=[(3, 0, 80), (4, 12, 30)], window=window,
                    sinks=sinks)
    row = 0
    for i, start, end in [(0, 69, 70), (1, 8, 9), (2, 0, 1), (3, 0, 80), (4, 12, 30)]:
        keys, values = seqs.cache.read(torch.tensor(seqs.tables[i]))
        keys, values = keys.flatten(0, 1)[:end], values.flatten(0, 1)[:end]
        expected = naive_attention(seqs.q[i][start:end], keys, values, torch.arange(start, end), SCALE, window,
                                   sinks)
        got = out[row : row + end - start].float()
        assert (got - expected).abs().max().item() < tol, f"sequence {i}"
        row += end - start


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,with_sinks", [(None, False), (7, True)])
def test_a_query_does_not_depend_on_its_batch(dtype, window, with_sinks):
    """Sequence 0's query at position 77 (context 78: two key blocks of 64): alone, beside longer and shorter
    decodes, as the last token of chunks cut at different places, inside a chunk with later tokens."""
    seqs = Sequences([90, 150, 3, 130], dtype, None)
    sinks = torch.randn(HEADS) + 1.0 if with_sinks else None
    alone = seqs.step([(0, 77)], [], window, sinks)[0]
    ways = {
        "decoded beside others": seqs.step([(1, 149), (0, 77), (2, 2)], [(3, 0, 130)], window, sinks)[1],
        "last of a chunk from 0": seqs.step([], [(0, 0, 78)], window, sinks)[77],
        "last of a chunk from 70": seqs.step([(1, 149)], [(0, 70, 78)], window, sinks)[1 + 7],
        "inside a chunk": seqs.step([], [(3, 0, 100), (0, 64, 90)], window, sinks)[100 + 13],
    }
    for way, out in ways.items():
        assert torch.equal(out, alone), way


def test_selected_only_in_deterministic_mode_and_only_on_cpu():
    cpu = torch.device("cpu")
    assert isinstance(select_attention_backend(cpu, "torch", None, deterministic=True),
                      BatchInvariantAttentionBackend)
    assert not isinstance(select_attention_backend(cpu, "torch"), BatchInvariantAttentionBackend)
    with pytest.raises(ValueError, match="deterministic=True cannot run on cuda"):
        select_attention_backend(torch.device("cuda"), "torch", None, deterministic=True)


def test_query_slices_bounding_memory_change_nothing(monkeypatch):
    """Long chunks are attended a slice of query rows at a time: the same bits as all at once."""
    seqs = Sequences([90, 150], torch.float32, None)
    whole = seqs.step([(0, 89)], [(1, 0, 150)], 7, None)
    monkeypatch.setattr(batch_invariant, "_MAX_SCORES", 4096)  # a few query rows per slice
    assert torch.equal(seqs.step([(0, 89)], [(1, 0, 150)], 7, None), whole)
