"""The KV cache's books: which blocks of the paged KV cache (gdsllm.models.kv_cache) each sequence
holds. One set of books, kept by the scheduler (gdsllm.engine.scheduler); the cache that holds
the keys and values (in-process, or in the service's compute worker) is handed each sequence's
block ids and allocates nothing itself.

    books = BlockBooks(num_blocks=1025, block_size=16)   # block 0 is the cache's scratch block
    books.fits(tokens)              # whole blocks for that many tokens are free now
    table = books.allocate(seq_id, tokens)   # its block ids, in position order
    books.free(seq_id)              # back to the pool
    books.used_blocks, books.capacity_tokens

A sequence takes, when it is admitted, the blocks of its prompt plus every token it may generate
(its max_tokens, capped by the context): no pass can then run out of memory halfway, and the
table a sequence gets never changes while it lives, so it crosses to the cache once. Draft tokens
being verified fit inside it (a sequence never drafts past its own max_tokens). Without prefix
sharing or preemption, this is vLLM's block manager at its simplest (nano-vllm's BlockManager).
"""
from __future__ import annotations

from gdsllm.models.kv_cache import SCRATCH_BLOCK, blocks_for


class BlockBooks:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged KV cache needs at least 2 blocks of at least 1 token, "
                             f"got {num_blocks} of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() gives low ids first
        self.tables: dict[int, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        """Tokens the cache holds (the scratch block left out)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def blocks(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def fits(self, tokens: int) -> bool:
        return self.blocks(tokens) <= len(self._free)

    def ever_fits(self, tokens: int) -> bool:
        """Whether that many tokens fit the whole cache (when nothing else holds blocks)."""
        return self.blocks(tokens) <= self.num_blocks - 1

    def allocate(self, seq_id: int, tokens: int) -> list[int]:
        """Blocks for `tokens` tokens of a new sequence; ValueError when they are not free."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds KV blocks")
        n = self.blocks(tokens)
        if n > len(self._free):
            raise ValueError(f"sequence {seq_id}: {tokens} tokens need {n} KV blocks of "
                             f"{self.block_size} tokens; {len(self._free)} of "
                             f"{self.num_blocks - 1} are free")
        table = [self._free.pop() for _ in range(n)]
        self.tables[seq_id] = table
        return list(table)

    def free(self, seq_id: int) -> bool:
        """Give `seq_id`'s blocks back; False for a sequence that holds none."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return False
        self._free.extend(reversed(table))
        return True
