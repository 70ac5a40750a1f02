"""Paged KV cache bookkeeping: fixed-size blocks, a free list, reference counts, automatic prefix caching by
chained block hashes (a full block is identified by its tokens and everything before it), and the host swap
space that preempted sequences' blocks are copied to."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from microscale.engine.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up in the prefix cache
    hits: int = 0  # of those, tokens found (their KV is reused, not computed)


@dataclass
class SwapPlan:
    """One step's block copies between the device cache and the host swap space, done before its forward:
    `out` first (a device block it frees may be refilled by `into`)."""

    out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    into: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)

    def __bool__(self) -> bool:
        return bool(self.out or self.into)


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, num_host_blocks: int = 0
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks in eviction order (least recently freed first); cached ones stay findable until reused.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.stats = PrefixCacheStats()
        self.num_host_blocks = num_host_blocks
        self.free_host_blocks = list(range(num_host_blocks))

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

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> int:
        """Give `seq` the blocks to hold `num_new_tokens` more tokens after its computed ones, reusing `cached`
        prefix blocks (for a sequence with none yet); returns the tokens those hold, computed from now on."""
        if cached:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for block in cached:
                self._take(block)
                seq.block_table.append(block)
                seq.block_hashes.append(self.block_hash[block])
        computed = seq.num_computed_tokens + len(cached) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._pop_free())
        return len(cached) * self.block_size

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_prompt_tokens
        self.stats.hits += num_hit_tokens

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> int:
        """Let `child` share the first `num_blocks` (full, immutable) blocks of `parent`; returns the tokens they
        hold, computed for the child from now on."""
        for block in parent.block_table[:num_blocks]:
            self.ref_counts[block] += 1
            child.block_table.append(block)
        child.block_hashes = list(parent.block_hashes[:num_blocks])
        return num_blocks * self.block_size

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            h = hash_block(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(h)
            self._register(seq.block_table[i], h)

    def free(self, seq: Sequence) -> None:
        """Release everything `seq` holds, on the device and in the swap space (none of its KV is kept)."""
        self._release(seq)
        self.free_host_blocks.extend(seq.host_blocks)
        seq.host_blocks = []
        seq.block_hashes = []

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Move the blocks of `seq`'s computed tokens to the swap space: their (device, host) copies, to be made
        before anything writes to the device blocks it releases; None (nothing changed) if the space is full.
        Its computed tokens and block hashes stay; shared blocks stay with their other holders."""
        num = self.blocks_needed(seq.num_computed_tokens)
        if num > len(self.free_host_blocks):
            return None
        host = [self.free_host_blocks.pop() for _ in range(num)]
        copies = list(zip(seq.block_table[:num], host))
        self._release(seq)
        seq.host_blocks = host
        return copies

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """New device blocks for a swapped-out `seq` (checked with can_allocate): the (host, device) copies that
        restore its KV. Its full blocks rejoin the prefix cache unless another block holds their hash now."""
        assert not seq.block_table
        seq.block_table = [self._pop_free() for _ in seq.host_blocks]
        # Registered once all are taken: taking a block drops its old hash, which may be one of these.
        for block, h in zip(seq.block_table, seq.block_hashes):
            self._register(block, h)
        copies = list(zip(seq.host_blocks, seq.block_table))
        self.free_host_blocks.extend(seq.host_blocks)
        seq.host_blocks = []
        return copies

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past those `seq`'s tokens need (speculation allocated room for drafts that were
        rejected). Those blocks hold no full block of its tokens, so no hash of them was registered."""
        keep = self.blocks_needed(seq.num_tokens)
        self._release(seq, keep)

    def _release(self, seq: Sequence, keep: int = 0) -> None:
        # Free the tail first so that, evicted in order, a prefix outlives its continuations.
        for block in reversed(seq.block_table[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = seq.block_table[:keep]

    def reset_prefix_cache(self) -> None:
        for block in range(self.num_blocks):
            self._forget_hash(block)

    def _pop_free(self) -> int:
        """The least recently freed block, now held once (its old prefix-cache entry is gone)."""
        block, _ = self.free_blocks.popitem(last=False)
        self._forget_hash(block)
        self.ref_counts[block] = 1
        return block

    def _register(self, block: int, h: bytes) -> None:
        if h not in self.hash_to_block and self.block_hash[block] is None:
            self.block_hash[block] = h
            self.hash_to_block[h] = block

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
