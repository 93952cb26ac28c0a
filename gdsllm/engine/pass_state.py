"""The inputs and running state of one weight pass, built by the Runner at `start_pass`.

    ps = decode_pass(runner, [(7, [tok]), (3, [tok])])       # one token per sequence (CUDA)
    ps = chunked_pass(runner, [(7, prompt_ids)], {7: 1})      # prompts, speculative chunks, CPU decode
    ps = chunked_pass(runner, [(7, [root] + nodes)], {7: 5}, {7: TreeSpec(...)})  # a token tree

Both pack every integer the pass needs (token ids, positions, KV slots, and the block tables of
a decode pass or each sequence's key slots otherwise) into one tensor and copy it to the device
once. A decode pass on CUDA lands in the static buffers of its batch bucket
(gdsllm.engine.graphs), so the pinned units' graphs read it; padding rows fill the bucket.
"""
from __future__ import annotations

import torch

from gdsllm.engine.graphs import Static, padding_row
from gdsllm.engine.tree import tree_positions, tree_visibility
from gdsllm.models.attention import PassBatch, Segment


class PassState:
    """State of the pass in flight: inputs, attention batch, running activations."""

    def __init__(self, seq_ids, ids, rope, batch, last_rows, commit, static=None):
        self.seq_ids, self.ids, self.rope = seq_ids, ids, rope  # rope: kind -> (cos, sin)
        self.batch, self.last_rows, self.commit = batch, last_rows, commit
        self.static: Static | None = static  # a decode pass's bucket buffers (CUDA graphs)
        self.x: torch.Tensor | None = None
        self.embedding: torch.Tensor | None = None  # the embed unit's table, for a tied head
        self.logits: torch.Tensor | None = None
        self.moe = None  # gdsllm.models.moe.Routing of a MoE block waiting for its experts
        self.next_unit = 0
        self.replayed_through = -1  # the last unit a graph replay of this pass ran


def decode_pass(runner, chunks) -> PassState:
    """One token per sequence: batched paged attention; on CUDA the static buffers of the
    batch's bucket, so pinned runs replay as graphs. One host-to-device copy."""
    cache, graphs, n = runner.cache, runner.graphs, len(chunks)
    bucket = graphs.bucket(n) if graphs is not None else None
    width = graphs.max_blocks if bucket else max(len(cache.tables[s]) for s, _ in chunks)
    rows = []
    for sid, (tok,) in chunks:
        past = cache.length(sid)
        rows.append([tok, past, cache.slot_list(sid, past, past + 1)[0], past + 1]
                    + cache.table_row(sid, width))
    rows += [padding_row(width)] * ((bucket or n) - n)
    packed = torch.tensor(rows, dtype=torch.long).to(runner.device)
    seq_ids, commit = [s for s, _ in chunks], [(sid, 1) for sid, _ in chunks]
    if bucket:
        st = graphs.static(bucket)
        st.load(packed, runner.rope)
        ps = PassState(seq_ids, st.ids, st.rope, st.batch, None, commit, st)
        ps.x = st.x
        return ps
    batch = PassBatch(cache, packed[:, 2], block_tables=packed[:, 4:].to(torch.int32),
                      seq_lens=packed[:, 3].to(torch.int32))
    return PassState(seq_ids, packed[:, 0], runner.rope(packed[:, 1]), batch, None, commit)


def consecutive(slots: list[int]) -> int | None:
    """slots[0] where `slots` is slots[0], slots[0] + 1, ... (Segment.first), else None."""
    first = slots[0]
    if slots[-1] - first != len(slots) - 1 or slots != list(range(first, first + len(slots))):
        return None
    return first


def chunked_pass(runner, chunks, rows_of: dict[int, int], trees: dict | None = None) -> PassState:
    """Prompts and multi-token chunks: per-sequence attention over gathered keys; `rows_of[sid]`
    logit rows (the chunk's last ones) for each sequence. `trees[sid]`: a TreeSpec
    (gdsllm.engine.tree) for the sequence's cache from its `start` on: those tokens sit at
    positions start + depth and see the prefix and their ancestors only."""
    cache, trees = runner.cache, trees or {}
    ids, positions, slots, last_rows, keys, spans, row = [], [], [], [], [], [], 0
    masks = {}
    for sid, toks in chunks:
        past, n = cache.length(sid), len(toks)
        ids += toks
        spec = trees.get(sid)
        if spec is None:
            positions += range(past, past + n)
        else:
            pos = tree_positions(spec, past + n)
            positions += pos[past:]
            masks[len(spans)] = (tree_visibility(spec, past, past + n), torch.tensor(pos))
        slots += cache.slot_list(sid, past, past + n)
        last_rows += range(row + n - rows_of[sid], row + n)
        spans.append((row, row + n, past, len(keys)))
        keys += cache.slot_list(sid, 0, past + n)
        row += n
    T, R = len(ids), len(last_rows)
    packed = torch.tensor(ids + positions + slots + last_rows + keys, dtype=torch.long).to(runner.device)
    key_slots = packed[3 * T + R:]
    # CPU only: views of the pool for consecutive keys (CUDA's prompt kernels are not measured so)
    cpu = runner.device.type == "cpu"
    segments = [Segment(a, b, past, key_slots[k: k + past + b - a],
                        first=consecutive(keys[k: k + past + b - a]) if cpu else None)
                for a, b, past, k in spans]
    for j, (mask, pos) in masks.items():  # token trees: their masks and key positions
        segments[j].mask = mask.to(runner.device)
        segments[j].positions = pos.to(runner.device)
    batch = PassBatch(cache, packed[2 * T: 3 * T], segments=segments)
    return PassState([s for s, _ in chunks], packed[:T], runner.rope(packed[T: 2 * T]), batch,
                     packed[3 * T: 3 * T + R], [(sid, len(toks)) for sid, toks in chunks])
