"""BlockManager: hands out KV-cache blocks to sequences, with reference counts and prefix caching.

A full block is identified by a chain hash — sha256 of its parent block's hash and its own token
ids — so two requests that share a prompt prefix share its blocks instead of recomputing them.
Freed blocks that hold a hash stay reusable until their space is needed (least recently freed
first), so a repeated system prompt stays cached between requests.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(b"".join(t.to_bytes(4, "little", signed=False) for t in token_ids))
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-hashed free blocks (a stack)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free blocks still holding a cached hash
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.prefix_queries = 0  # prompt blocks looked up in the prefix cache
        self.prefix_hits = 0  # of those, found

    # ---- accounting ----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a sequence holding `block_table` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    # ---- allocation ----------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._block_of.pop(self._hash_of.pop(block), None)
        self.ref_counts[block] = 1
        return block

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Append blocks so the table holds `num_tokens` tokens; False (and no change) if there are too few."""
        needed = self.blocks_needed(block_table, num_tokens)
        if needed > self.num_free_blocks:
            return False
        block_table.extend(self._take() for _ in range(needed))
        return True

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens (a rejected draft's; never shared)."""
        keep = -(-num_tokens // self.block_size)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.free(tail)

    def free(self, block_table: list[int]) -> None:
        for block in reversed(block_table):  # the tail is the least likely to be shared: evict it first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    # ---- prefix caching ---------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding a prefix of token_ids (at most max_tokens tokens); takes a reference on each."""
        blocks: list[int] = []
        hashes: list[bytes] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        parent = None
        for start in range(0, max_tokens - self.block_size + 1, self.block_size):
            self.prefix_queries += 1
            h = block_hash(parent, token_ids[start : start + self.block_size])
            block = self._block_of.get(h)
            if block is None:
                break
            self.prefix_hits += 1
            if self.ref_counts[block] == 0:
                self._evictable.pop(block, None)
            self.ref_counts[block] += 1
            blocks.append(block)
            hashes.append(h)
            parent = h
        return blocks, hashes

    def register_full_blocks(self, block_table: list[int], token_ids: list[int], hashes: list[bytes]) -> None:
        """Record the hash of every block of `block_table` that `token_ids` now fills; extends `hashes`."""
        if not self.enable_prefix_caching:
            return
        full = min(len(token_ids) // self.block_size, len(block_table))
        while len(hashes) < full:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else None, token_ids[i * self.block_size : (i + 1) * self.block_size])
            hashes.append(h)
            block = block_table[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = h
