"""CUDA graphs of the decode step over runs of resident units, one set per batch-size bucket.

A decode pass (every sequence brings one token) has static shapes once its batch is padded to a
bucket: the runner keeps, per bucket, static input buffers (token ids, positions, rotary tables,
KV slots, block tables, lengths), the activations `x` and the logits. A run of consecutive
resident (pinned) units is captured once per bucket, on first use, and replayed afterwards: one
launch instead of a few hundred kernels, each with its Python and launch cost. Streamed units run
eagerly on the same buffers between replays (their weights' addresses change every pass).

    graphs = DecodeGraphs(runner, buckets=(1, 2, 4, 8, 16, 32))
    st = graphs.static(bucket)          # the buffers a decode pass of that bucket uses
    graphs.replay(run, st)              # run = (first, last) unit indices, all pinned

Padding rows (bucket > batch) carry token 0 at position 0, write their key/value to the cache's
scratch block and read only that slot; their logits are dropped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gdsllm.models.kv_cache import SCRATCH_BLOCK, blocks_for
from gdsllm.models.attention import PassBatch

log = logging.getLogger("gdsllm.engine.graphs")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


@dataclass
class Static:
    """One bucket's buffers; `batch` is the PassBatch every layer of a decode pass reads."""

    size: int
    ids: torch.Tensor        # [B] int64
    positions: torch.Tensor  # [B] int64
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    batch: PassBatch
    x: torch.Tensor          # [B, hidden]
    logits: torch.Tensor     # [B, vocab] float32
    ints: torch.Tensor       # [B, 4 + max_blocks] int64: the one upload per pass lands here

    def load(self, packed: torch.Tensor, rope_of) -> None:
        """Copy a pass's packed integers (device tensor [B, 4 + max_blocks]: id, position, slot,
        length, block table) into the static buffers; `rope_of(positions)` -> {kind: (cos, sin)}."""
        self.ints.copy_(packed)
        self.ids.copy_(self.ints[:, 0])
        self.positions.copy_(self.ints[:, 1])
        self.batch.slots.copy_(self.ints[:, 2])
        self.batch.seq_lens.copy_(self.ints[:, 3])
        self.batch.block_tables.copy_(self.ints[:, 4:])
        for kind, (cos, sin) in rope_of(self.positions).items():
            self.rope[kind][0].copy_(cos)
            self.rope[kind][1].copy_(sin)


def padding_row(max_blocks: int) -> list[int]:
    """Token 0 at position 0, written to slot 0 of the scratch block, a length of 1."""
    return [0, 0, SCRATCH_BLOCK, 1] + [SCRATCH_BLOCK] * max_blocks


class DecodeGraphs:
    def __init__(self, runner, buckets: tuple[int, ...] = BUCKETS):
        self.runner, self.buckets = runner, buckets
        p = runner.p
        self.max_blocks = blocks_for(p.max_position_embeddings, runner.cache.block_size)
        self._static: dict[int, Static] = {}
        self._graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.capture_seconds = 0.0

    def bucket(self, n: int) -> int | None:
        """The smallest bucket holding n rows (None: larger than every bucket, run eagerly)."""
        return next((b for b in self.buckets if b >= n), None)

    def static(self, size: int) -> Static:
        st = self._static.get(size)
        if st is None:
            r, p, dev = self.runner, self.runner.p, self.runner.device
            i64 = dict(dtype=torch.long, device=dev)
            rope = {k: (torch.zeros(size, p.head_dim, dtype=r.dtype, device=dev),
                        torch.zeros(size, p.head_dim, dtype=r.dtype, device=dev)) for k in r.inv_freqs}
            batch = PassBatch(r.cache, torch.zeros(size, **i64),
                              block_tables=torch.zeros(size, self.max_blocks, dtype=torch.int32, device=dev),
                              seq_lens=torch.ones(size, dtype=torch.int32, device=dev))
            st = Static(size, torch.zeros(size, **i64), torch.zeros(size, **i64), rope, batch,
                        torch.zeros(size, p.hidden_size, dtype=r.dtype, device=dev),
                        torch.zeros(size, p.vocab_size, dtype=torch.float32, device=dev),
                        torch.zeros(size, 4 + self.max_blocks, **i64))
            self._static[size] = st
        return st

    def replay(self, run: tuple[int, int], st: Static, body) -> None:
        """Run units run[0]..run[1] (all pinned) for bucket `st`: capture on first use, then
        replay. `body()` runs them eagerly, reading and writing only `st`'s buffers."""
        key = (run[0], run[1], st.size)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(body, st)
            self._graphs[key] = g
        g.replay()

    def _capture(self, body, st: Static) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        saved_x = st.x.clone()
        # Warm-up on a side stream (cuBLAS workspaces, Triton compilation) as torch asks; it
        # computes what the replay will (the same keys into the same slots), then the input is
        # put back for the capture, which runs nothing, and for the replay that follows.
        s = torch.cuda.Stream(self.runner.device)
        s.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream(self.runner.device).wait_stream(s)
        st.x.copy_(saved_x)
        g = torch.cuda.CUDAGraph()
        # thread_local: the prefetch thread (gdsllm.engine.prefetch) keeps reading into its slots
        # on its own stream during a capture; in the default "global" mode its CUDA calls (event
        # waits, copies) invalidate this capture (cudaErrorStreamCaptureInvalidated, seen on the
        # H200 in streamed runs with graphs), though they touch nothing the graph records
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
            body()
        self._pool = g.pool()
        seconds = time.perf_counter() - t0
        self.capture_seconds += seconds
        log.info("captured a CUDA graph for batch %d in %.2f s", st.size, seconds)
        return g

    def clear(self) -> None:
        """Drop every graph (the pinned units changed)."""
        self._graphs.clear()
