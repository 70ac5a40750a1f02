"""Paged KV cache bookkeeping: fixed-size blocks, a free list, reference counts, and automatic prefix
caching by chained block hashes (a full block is identified by its tokens and everything before it)."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from microscale.engine.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up in the prefix cache
    hits: int = 0  # of those, tokens found (their KV is reused, not computed)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks in eviction order (least recently freed first); cached ones stay findable until reused.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks in the prefix cache that hold this sequence's leading tokens. At least one token is
        always left to compute, since its logits are needed."""
        if not self.enable_prefix_caching:
            return []
        found = []
        parent = b""
        for i in range((seq.num_tokens - 1) // self.block_size):
            parent = hash_block(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block = self.hash_to_block.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        # The new tokens come after the cached prefix, which allocate() makes the computed tokens.
        computed = seq.num_computed_tokens + len(cached) * self.block_size
        new_blocks = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)  # cached blocks taken off the free list
        return new_blocks + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> None:
        """Give `seq` the blocks to hold `num_new_tokens` more tokens, reusing `cached` prefix blocks."""
        if cached:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for block in cached:
                self._take(block)
                seq.block_table.append(block)
                seq.block_hashes.append(self.block_hash[block])
            seq.num_computed_tokens = len(cached) * self.block_size
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            self._forget_hash(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_prompt_tokens
        self.stats.hits += num_hit_tokens

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Let `child` share the first `num_blocks` (full, immutable) blocks of `parent`."""
        for block in parent.block_table[:num_blocks]:
            self.ref_counts[block] += 1
            child.block_table.append(block)
        child.block_hashes = list(parent.block_hashes[:num_blocks])
        child.num_computed_tokens = num_blocks * self.block_size

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = hash_block(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.block_hash[block] = h
                self.hash_to_block[h] = block

    def free(self, seq: Sequence) -> None:
        # Free the tail first so that, evicted in order, a prefix outlives its continuations.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for block in range(self.num_blocks):
            self._forget_hash(block)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _forget_hash(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
