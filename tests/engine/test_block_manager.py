"""BlockManager unit tests: allocation, reference counts, prefix-cache hash chaining, eviction order, fork."""

from __future__ import annotations

import pytest

from microscale.engine.block_manager import BlockManager, hash_block
from microscale.engine.sequence import Request, Sequence
from microscale.sampling_params import SamplingParams


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(Request("r", None, list(tokens), SamplingParams()), 0, detokenizer=None)


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """Allocate for and 'compute' the next `n` tokens (all that are left by default), as a step would."""
    n = seq.num_tokens - seq.num_computed_tokens if n is None else n
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """What the scheduler does for a fresh sequence: reuse its cached prefix, compute the rest."""
    cached = bm.find_cached_prefix(seq)
    n = seq.num_tokens - len(cached) * bm.block_size
    assert bm.can_allocate(seq, n, cached)
    seq.num_computed_tokens += bm.allocate(seq, n, cached) + n
    bm.cache_full_blocks(seq)
    return cached


def release(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does when a sequence ends or is recomputed: its blocks go back, nothing is computed."""
    bm.free(seq)
    seq.num_computed_tokens = 0


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        for block in seq.block_table:
            refs[block] += 1
    assert bm.ref_counts == refs
    assert set(bm.free_blocks) == {b for b in range(bm.num_blocks) if refs[b] == 0}
    for h, block in bm.hash_to_block.items():
        assert bm.block_hash[block] == h


def test_allocate_free_and_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(1) == 1 and bm.blocks_needed(4) == 1
    assert bm.blocks_needed(5) == 2
    a, b = make_seq(range(10)), make_seq(range(100, 103))
    compute(bm, a)
    compute(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4  # no block handed out twice
    assert bm.num_free_blocks == 4
    check_invariants(bm, [a, b])

    # Decoding: a new block only when a token crosses a block boundary.
    a.token_ids += [10, 11]  # 12 tokens fit in 3 blocks
    compute(bm, a)
    assert len(a.block_table) == 3
    a.token_ids.append(12)
    compute(bm, a)
    assert len(a.block_table) == 4 and bm.num_free_blocks == 3
    check_invariants(bm, [a, b])

    release(bm, a)
    assert a.block_table == [] and a.num_computed_tokens == 0 and a.block_hashes == []
    check_invariants(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm, [])


def test_can_allocate_respects_free_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(range(12))
    assert bm.can_allocate(a, 12)
    compute(bm, a)
    b = make_seq(range(50, 58))
    assert not bm.can_allocate(b, 8)  # 2 blocks needed, 1 free
    assert bm.can_allocate(b, 4)  # a first chunk fits
    bm.free(a)
    assert bm.can_allocate(b, 8)


def test_block_hashes_chain_over_the_whole_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    compute(bm, seq)
    h0 = hash_block(b"", [1, 2, 3, 4])
    h1 = hash_block(h0, [5, 6, 7, 8])
    assert seq.block_hashes == [h0, h1]  # only full blocks; the partial third is not hashed
    assert bm.hash_to_block == {h0: seq.block_table[0], h1: seq.block_table[1]}
    # The same tokens after a different prefix are a different block.
    assert hash_block(hash_block(b"", [9, 9, 9, 9]), [5, 6, 7, 8]) != h1
    assert hash_block(b"", [5, 6, 7, 8]) != h1
    assert hash_block(b"", [1, 2, 3, 4]) == h0  # deterministic
    # Token ids are hashed as 64-bit integers: no collisions between e.g. [1, 23] and [12, 3].
    assert hash_block(b"", [1, 23]) != hash_block(b"", [12, 3])
    check_invariants(bm, [seq])
    bm.free(seq)


def test_only_computed_full_blocks_are_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(1, 11))
    compute(bm, seq, 6)  # a chunked prefill: 6 of 10 tokens computed
    assert len(seq.block_hashes) == 1 and len(bm.hash_to_block) == 1
    compute(bm, seq, 4)
    assert len(seq.block_hashes) == 2 and len(bm.hash_to_block) == 2
    bm.free(seq)
    check_invariants(bm, [])


def test_find_cached_prefix_and_reuse():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(1, 14)))  # 13 tokens: 3 full blocks
    compute(bm, first)
    first_blocks = list(first.block_table)
    bm.free(first)
    assert bm.num_free_blocks == 16

    # Same 12 leading tokens, then different: the 3 full blocks are found, from the free list.
    second = make_seq(list(range(1, 13)) + [99, 98, 97])
    cached = admit(bm, second)
    assert cached == first_blocks[:3]
    assert second.block_table[:3] == first_blocks[:3]
    assert second.num_computed_tokens == 15 and len(second.block_table) == 4
    assert all(bm.ref_counts[b] == 1 for b in cached) and not set(cached) & set(bm.free_blocks)
    check_invariants(bm, [second])

    # A prefix that diverges inside block 1 gets block 0 only; one diverging in block 0 gets nothing.
    third = make_seq([1, 2, 3, 4, 5, 6, 0, 8, 9])
    assert bm.find_cached_prefix(third) == first_blocks[:1]
    assert bm.find_cached_prefix(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []

    # Shared by two live sequences: ref count 2.
    cached = admit(bm, third)
    assert bm.ref_counts[first_blocks[0]] == 2
    check_invariants(bm, [second, third])

    # At least one token is always left to compute (its logits are needed): exactly 2 full blocks of a known
    # prefix reuse only the first.
    exact = make_seq(list(range(1, 9)))
    assert bm.find_cached_prefix(exact) == first_blocks[:1]
    assert bm.find_cached_prefix(make_seq(list(range(1, 10)))) == first_blocks[:2]
    for seq in (second, third):
        bm.free(seq)
    check_invariants(bm, [])


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = make_seq(range(1, 10))
    compute(bm, seq)
    assert bm.hash_to_block == {} and seq.block_hashes == []
    bm.free(seq)
    assert bm.find_cached_prefix(make_seq(range(1, 10))) == []


def test_eviction_order_lru_and_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])  # 3 blocks, 2 full (cached)
    b = make_seq([7, 8, 9, 10, 11])
    compute(bm, a)
    compute(bm, b)
    a0, a1, a2 = a.block_table
    b0, b1, b2 = b.block_table
    bm.free(a)  # freed first: evicted first; within a sequence its tail goes before its prefix
    bm.free(b)
    assert list(bm.free_blocks) == [a2, a1, a0, b2, b1, b0]

    # Freed blocks keep their hashes: both prefixes are still findable.
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 0])) == [a0, a1]
    assert bm.find_cached_prefix(make_seq([7, 8, 9, 10, 0])) == [b0, b1]

    # A new sequence needing 2 blocks evicts a's tail (the uncached partial block, then a1): a keeps a0 only.
    c = make_seq([50, 51, 52, 53])
    compute(bm, c)
    assert c.block_table == [a2, a1]
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 0])) == [a0]
    assert bm.find_cached_prefix(make_seq([7, 8, 9, 10, 0])) == [b0, b1]

    # Reusing cached blocks takes them off the free list (not evictable while in use); the new block d needs
    # evicts a0, the least recently freed.
    assert list(bm.free_blocks) == [a0, b2, b1, b0]
    d = make_seq([7, 8, 9, 10, 0])
    assert admit(bm, d) == [b0, b1]
    assert d.block_table == [b0, b1, a0] and list(bm.free_blocks) == [b2]
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 0])) == []
    # Freed again, they go to the back (most recently used), tail first.
    bm.free(d)
    assert list(bm.free_blocks) == [b2, a0, b1, b0]
    e = make_seq([60, 61, 62])
    compute(bm, e)
    assert e.block_table == [b2, a0]
    assert bm.find_cached_prefix(make_seq([7, 8, 9, 10, 0])) == [b0, b1]
    f = make_seq([70])
    compute(bm, f)
    assert f.block_table == [b1]  # b's tail before its head
    assert bm.find_cached_prefix(make_seq([7, 8, 9, 10, 0])) == [b0]
    for seq in (c, e, f):
        bm.free(seq)
    check_invariants(bm, [])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(1, 10))
    compute(bm, seq)
    bm.free(seq)
    assert bm.find_cached_prefix(make_seq(range(1, 10)))
    bm.reset_prefix_cache()
    assert bm.hash_to_block == {} and all(h is None for h in bm.block_hash)
    assert bm.find_cached_prefix(make_seq(range(1, 10))) == []
    assert bm.num_free_blocks == 8


def test_same_content_computed_twice_keeps_one_cache_entry():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(range(1, 10)), make_seq(range(1, 10))  # e.g. two identical prompts in one step
    compute(bm, a)
    compute(bm, b)
    assert a.block_hashes == b.block_hashes
    assert set(bm.hash_to_block.values()) == set(a.block_table[:2])
    a_blocks = list(a.block_table)
    bm.free(a)
    bm.free(b)
    check_invariants(bm, [])
    assert bm.find_cached_prefix(make_seq(range(1, 10))) == a_blocks[:2]


def test_fork_shares_full_prompt_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(range(1, 11))  # 10 tokens: blocks 0 and 1 full, block 2 partial
    compute(bm, parent)
    child = make_seq(range(1, 11))
    child.num_computed_tokens = bm.fork(parent, child, 2)
    assert child.block_table == parent.block_table[:2]
    assert child.block_hashes == parent.block_hashes[:2]
    assert child.num_computed_tokens == 8
    assert [bm.ref_counts[b] for b in parent.block_table] == [2, 2, 1]
    check_invariants(bm, [parent, child])

    # The child computes its own copy of the partial block.
    compute(bm, child)
    assert child.block_table[2] != parent.block_table[2]
    check_invariants(bm, [parent, child])

    bm.free(parent)
    assert all(bm.ref_counts[b] == 1 for b in child.block_table)
    assert not set(child.block_table) & set(bm.free_blocks)
    check_invariants(bm, [child])
    bm.free(child)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 8


def test_can_allocate_counts_all_blocks_behind_a_cached_prefix():
    """A sequence reusing k cached blocks needs blocks for its whole length minus those k, not for the
    uncached tokens minus k."""
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(range(1, 14))  # 13 tokens: 3 full cached blocks
    compute(bm, first)
    bm.free(first)
    hog = make_seq(range(100, 108))  # 2 blocks in use: 6 free, 3 of them the cached prefix
    compute(bm, hog)
    # 12 cached tokens + 13 more = 25 tokens = 7 blocks: 3 cached + 4 new = 7 taken from 6 free ones.
    second = make_seq(list(range(1, 13)) + list(range(200, 213)))
    cached = bm.find_cached_prefix(second)
    assert len(cached) == 3
    assert not bm.can_allocate(second, second.num_tokens - 12, cached)
    # A first chunk of 8 uncached tokens (2 new blocks, 5 taken) fits.
    assert bm.can_allocate(second, 8, cached)
    second.num_computed_tokens += bm.allocate(second, 8, cached)
    assert len(second.block_table) == 5 and second.num_computed_tokens == 12
    bm.free(second)
    bm.free(hog)
    check_invariants(bm, [])


@pytest.mark.parametrize("num_cached_free", [0, 1])
def test_can_allocate_counts_revived_blocks(num_cached_free):
    bm = BlockManager(num_blocks=4, block_size=4)
    first = make_seq(range(1, 10))  # 2 full blocks cached
    compute(bm, first)
    if num_cached_free:
        bm.free(first)  # the cached blocks sit on the free list: reusing them takes free blocks
        hog = make_seq(range(100, 108))
        compute(bm, hog)  # takes the never-used block and evicts the partial one: free = the 2 cached ones
        assert bm.num_free_blocks == 2
        second = make_seq(list(range(1, 9)) + [50])  # 2 cached + 1 new = 3 > 2 free
        cached = bm.find_cached_prefix(second)
        assert len(cached) == 2
        assert not bm.can_allocate(second, 1, cached)
        bm.free(hog)
    else:
        # The cached blocks are in use by `first`: sharing them costs nothing, 1 free block suffices.
        second = make_seq(list(range(1, 9)) + [50])
        cached = bm.find_cached_prefix(second)
        assert bm.num_free_blocks == 1
        assert bm.can_allocate(second, 1, cached)
        bm.free(first)


# ---- swap space ----------------------------------------------------------------------------------------------


def check_swap_space(bm: BlockManager, swapped: list[Sequence]) -> None:
    held = [b for seq in swapped for b in seq.host_blocks]
    assert len(held) == len(set(held)) and not set(held) & set(bm.free_host_blocks)
    assert len(held) + len(bm.free_host_blocks) == bm.num_host_blocks


def test_swap_out_and_in_restore_the_free_counts():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=4)
    a = make_seq(range(1, 11))  # 10 tokens: 3 blocks, 2 of them full (cached)
    compute(bm, a)
    blocks, hashes = list(a.block_table), list(a.block_hashes)
    copies = bm.swap_out(a)
    assert [device for device, _ in copies] == blocks
    assert [host for _, host in copies] == a.host_blocks and len(a.host_blocks) == 3
    # Every device block is free again; the sequence keeps its computed tokens and hashes.
    assert bm.num_free_blocks == 8 and a.block_table == []
    assert a.num_computed_tokens == 10 and a.block_hashes == hashes
    assert len(bm.free_host_blocks) == 1
    check_invariants(bm, [])
    check_swap_space(bm, [a])

    # Something else takes (and evicts) the blocks meanwhile; resuming needs 3 blocks for 10 tokens + 1 new.
    hog = make_seq(range(500, 524))  # 6 blocks: 2 left
    compute(bm, hog)
    assert not bm.can_allocate(a, 1)
    bm.free(hog)
    assert bm.can_allocate(a, 1)
    host = list(a.host_blocks)
    copies = bm.swap_in(a)
    assert [h for h, _ in copies] == host and [d for _, d in copies] == a.block_table
    assert len(bm.free_host_blocks) == 4
    check_swap_space(bm, [])
    a.token_ids.append(11)
    compute(bm, a)  # the new token goes in the third block, as before
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    # Its full blocks are in the prefix cache again, at their new places.
    assert [bm.hash_to_block[h] for h in hashes] == a.block_table[:2]
    check_invariants(bm, [a])
    bm.free(a)
    assert bm.num_free_blocks == 8
    check_invariants(bm, [])


def test_swap_out_keeps_shared_prefix_blocks_for_the_other_holders():
    bm = BlockManager(num_blocks=16, block_size=4, num_host_blocks=8)
    first = make_seq(list(range(1, 14)))  # 3 full blocks + 1 token
    compute(bm, first)
    second = make_seq(list(range(1, 13)) + [99, 98])  # shares first's 3 full blocks
    cached = admit(bm, second)
    assert len(cached) == 3 and all(bm.ref_counts[b] == 2 for b in cached)
    shared_hashes = list(first.block_hashes)

    bm.swap_out(first)
    # The shared blocks stay with second (ref count 1), still cached under their hashes; first's tail is free.
    assert all(bm.ref_counts[b] == 1 for b in cached)
    assert [bm.hash_to_block[h] for h in shared_hashes] == cached
    assert bm.num_free_blocks == 16 - 4
    check_invariants(bm, [second])

    copies = bm.swap_in(first)
    assert len(copies) == 4 and not set(first.block_table) & set(second.block_table)
    # The prefix cache keeps pointing at the blocks second holds: the copies do not replace them.
    assert [bm.hash_to_block[h] for h in shared_hashes] == cached
    assert all(bm.block_hash[b] is None for b in first.block_table)
    check_invariants(bm, [first, second])
    check_swap_space(bm, [])
    bm.free(first)
    bm.free(second)
    assert bm.num_free_blocks == 16
    check_invariants(bm, [])


def test_swap_out_refused_when_the_swap_space_is_full():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=2)
    a = make_seq(range(1, 11))  # 3 blocks
    compute(bm, a)
    table = list(a.block_table)
    assert bm.swap_out(a) is None
    assert a.block_table == table and a.host_blocks == [] and len(bm.free_host_blocks) == 2
    check_invariants(bm, [a])
    bm.free(a)


def test_free_releases_a_swapped_out_sequence():
    bm = BlockManager(num_blocks=8, block_size=4, num_host_blocks=4)
    a = make_seq(range(1, 7))
    compute(bm, a)
    bm.swap_out(a)
    release(bm, a)  # aborted while swapped out
    assert a.host_blocks == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and len(bm.free_host_blocks) == 4
    check_invariants(bm, [])
