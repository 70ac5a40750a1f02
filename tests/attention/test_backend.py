"""The attention backend seam: both backends have the protocol's members with its signatures, any object that
has them plugs into the attention layer, and the torch backend's decode buffer gives the paged result whatever
order the step lists its decodes in."""

from __future__ import annotations

import inspect

import pytest
import torch

from microscale.attention.backend import AttentionBackend
from microscale.attention.metadata import AttentionMetadata, DecodeBatch, DecodeSequences
from microscale.attention.torch_backend import TorchAttentionBackend
from microscale.layers.attention import Attention
from microscale.quant.kv_cache import KVCache, make_kv_cache

BLOCK = 4
_MEMBERS = ("bind_kv_caches", "kv_cache_changed", "prepare", "forward")


def _triton_backend():
    pytest.importorskip("triton")
    from microscale.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


@pytest.mark.parametrize("make", [TorchAttentionBackend, _triton_backend])
def test_backends_have_the_protocols_members_and_signatures(make):
    backend = make()
    assert isinstance(backend.name, str) and isinstance(backend.graph_safe, bool)
    for member in _MEMBERS:
        want = inspect.signature(getattr(AttentionBackend, member))
        got = inspect.signature(getattr(type(backend), member))
        assert list(got.parameters) == list(want.parameters), member


class _StubBackend:
    """Satisfies AttentionBackend; records what the layer hands it."""

    name = "stub"
    graph_safe = False

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def bind_kv_caches(self, kv_caches, num_blocks, block_size, max_num_seqs, max_model_len) -> None:
        pass

    def kv_cache_changed(self) -> None:
        pass

    def prepare(self, meta) -> None:
        pass

    def forward(self, q, k, v, kv_cache, meta, scale, window, layer_index, sinks=None) -> torch.Tensor:
        self.calls.append(dict(q=q, k=k, v=v, kv_cache=kv_cache, meta=meta, scale=scale, window=window,
                               layer_index=layer_index, sinks=sinks))
        return torch.full((q.shape[0], q.shape[1] * q.shape[2]), 7.0)


def test_a_stub_backend_plugs_into_the_attention_layer():
    stub: AttentionBackend = _StubBackend()
    layer = Attention(4, 2, 8, 0.125, window=16, layer_index=3, sinks=True)
    layer.backend, layer.kv_cache = stub, make_kv_cache(None, 2, 8, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata(torch.zeros(5, dtype=torch.int64), torch.arange(5), None, [])
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    out = layer(q, k, v, meta)
    assert torch.equal(out, torch.full((5, 32), 7.0))
    (call,) = stub.calls
    assert call["q"] is q and call["k"] is k and call["v"] is v and call["meta"] is meta
    assert call["kv_cache"] is layer.kv_cache and call["sinks"] is layer.sinks
    assert (call["scale"], call["window"], call["layer_index"]) == (0.125, 16, 3)


def _decode_step(cache: KVCache, seqs: list[tuple[int, int, list[int]]], heads: int):
    """q, k, v and the metadata of one step in which every (seq id, cached tokens, block table) decodes."""
    ids, cached, tables = (list(column) for column in zip(*seqs))
    positions = torch.tensor(cached)
    slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p, table in zip(cached, tables)]
    slots = torch.tensor(slots)
    decode = DecodeBatch(len(seqs), positions, max(cached) + 1, sequences=DecodeSequences(ids, cached, tables))
    meta = AttentionMetadata(slots // BLOCK, slots % BLOCK, decode, [])
    n, kv_heads, dim = len(seqs), cache.kv_heads, cache.head_dim
    return torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim), meta


def _paged_meta(meta: AttentionMetadata) -> AttentionMetadata:
    d = meta.decode
    return AttentionMetadata(meta.slot_blocks, meta.slot_offsets, DecodeBatch(d.size, d.positions, d.length,
                                                                               sequences=d.sequences), [])


@pytest.mark.parametrize("window", [None, 3])
def test_decode_buffer_matches_paged_reads_when_decodes_come_out_of_row_order(window):
    torch.manual_seed(0)
    heads, kv_heads, dim, num_blocks = 4, 2, 8, 16
    cache = make_kv_cache(None, kv_heads, dim, torch.float32, torch.device("cpu"))
    cache.allocate(num_blocks, BLOCK)
    every_slot = torch.arange(num_blocks).repeat_interleave(BLOCK), torch.arange(BLOCK).repeat(num_blocks)
    cache.write(torch.randn(num_blocks * BLOCK, kv_heads, dim), torch.randn(num_blocks * BLOCK, kv_heads, dim),
                *every_slot)
    buffered, paged = TorchAttentionBackend(cpu_kernel=False), TorchAttentionBackend()
    buffered.bind_kv_caches([cache], num_blocks, BLOCK, max_num_seqs=3, max_model_len=16)
    assert buffered.decode_buffer is not None
    tables = {0: [3, 7], 1: [1, 2, 9], 2: [4]}
    # Step 1 gives rows in the order listed; step 2 lists them otherwise (and a sequence left).
    for step in ([(0, 5, tables[0]), (1, 9, tables[1]), (2, 2, tables[2])], [(2, 3, tables[2]), (0, 6, tables[0])],
                 [(1, 10, tables[1]), (0, 7, tables[0])]):
        q, k, v, meta = _decode_step(cache, step, heads)
        buffered.prepare(meta)
        got = buffered.forward(q, k, v, cache, meta, dim**-0.5, window, 0)
        want = paged.forward(q, k, v, cache, _paged_meta(meta), dim**-0.5, window, 0)
        assert (got - want).abs().max().item() < 1e-5
