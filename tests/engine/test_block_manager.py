"""BlockManager: reference counts, freeing, prefix hashing and eviction order."""

from __future__ import annotations

from shoal.engine.block_manager import BlockManager, block_hash


def test_grow_and_free():
    blocks = BlockManager(num_blocks=4, block_size=4)
    table: list[int] = []
    assert blocks.grow(table, 9) and len(table) == 3
    assert not blocks.grow(table, 17)  # would need 5 blocks
    assert len(table) == 3 and blocks.num_free_blocks == 1
    blocks.free(table)
    assert table == [] and blocks.num_free_blocks == 4


def test_prefix_blocks_are_shared_and_survive_until_evicted():
    blocks = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    table: list[int] = []
    hashes: list[bytes] = []
    blocks.grow(table, 5)
    blocks.register_full_blocks(table, tokens, hashes)
    assert len(hashes) == 2 and hashes[1] == block_hash(hashes[0], [3, 4])
    shared, _ = blocks.match_prefix(tokens, max_tokens=4)
    assert shared == table[:2] and blocks.ref_counts[table[0]] == 2
    blocks.free(table)
    blocks.free(shared)
    assert blocks.num_free_blocks == 4
    again, _ = blocks.match_prefix(tokens, max_tokens=4)  # freed but still cached
    assert len(again) == 2
    blocks.free(again)
    other: list[int] = []
    assert blocks.grow(other, 8)  # needs every block: the cached ones are evicted
    assert blocks.match_prefix(tokens, max_tokens=4)[0] == []


def test_hash_is_a_chain_not_pythons_hash():
    assert block_hash(None, [1, 2]) != block_hash(block_hash(None, [0, 0]), [1, 2])
    assert len(block_hash(None, [1, 2])) == 32  # sha256
