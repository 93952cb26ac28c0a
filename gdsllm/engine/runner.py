"""The batched step: one pass over the model's units serves a batch of sequences.

Each sequence brings its own new tokens (a whole prompt, or one token) at its own position in its
own KV cache; the matmuls run once over the tokens of all sequences flattened ([T, hidden]),
attention runs per sequence. This is the shape continuous batching needs: a sequence may join
(new seq_id) or leave (`release`) between any two passes.

    runner = Runner(meta.params, "cpu", torch.float32)
    runner.start_pass([(7, prompt_ids), (3, [last_token])])
    for unit in meta.units:                    # embed, block.0 .. block.N-1, head, in order
        runner.run_unit(unit, unit_tensors(unit, buf_holding(unit)))
        runner.fence()                         # before the buffer is refilled (CUDA: async work)
    logits = runner.end_pass()                 # float32 [2, vocab]: last token of each chunk
    # A mixture of experts: after each block unit, runner.routed_experts() names the experts the
    # batch needs; runner.run_expert(expert_unit, weights) for each (gdsllm.engine.experts).
    runner.release(7)                          # frees its KV cache

`start_pass(chunks, logit_rows={3: 4})` returns logits for the last 4 tokens of sequence 3's chunk
(speculative decoding scores every drafted position), rows in chunk order; `truncate(3, n)` then
rolls its KV cache back to its first n tokens (rejected draft tokens). `start_pass(chunks,
logit_rows=..., trees={3: TreeSpec(start, parents)})` scores a token tree (gdsllm.engine.tree):
its nodes see their ancestors only; `compact(3, start, keep)` then keeps the accepted path.

A tied model stored once has no LM head in its head unit: the head multiplies by the embedding
table the embed unit of the same pass was given, so that unit's buffer must still hold it when the
head runs (gdsllm.engine.planner.plan_for keeps it resident).

All sequences share one paged KV cache (gdsllm.models.kv_cache) of `kv_tokens` tokens. Resident
units are `pin`ned once: on CUDA a decode pass (one token per sequence) replays a CUDA graph per
run of consecutive pinned units and batch-size bucket (gdsllm.engine.graphs) instead of launching
their kernels one by one; prompts and speculative chunks run eagerly. On the CPU a pinned unit
runs over copies of its quantized / half-precision weights in the form the CPU kernels read,
made once on its first use within a memory budget (gdsllm.engine.host_copies.HostCopies), without
dequantizing every pass; a decode pass of one sequence runs each LLaMA block over those copies
as one call (gdsllm.models.cpu_compiled): scripted by TorchScript (the eager block's ops and
bits, without Python between them), or with `cpu_compile` compiled by torch.compile; made when the
first block unit is pinned.

This interface is what the compute worker process codes against; keep its names and meaning.
"""
from __future__ import annotations

import torch

from gdsllm.models import family, layers, llama
from gdsllm.models.cpu_compiled import CompiledBlocks
from gdsllm.format.metadata import DTYPES, LlamaParams, UnitMeta, unit_layout
from gdsllm.engine.graphs import DecodeGraphs, Static
from gdsllm.engine.pass_state import PassState, chunked_pass, decode_pass
from gdsllm.engine.expert_steps import ExpertSteps
from gdsllm.models.kv_cache import KVCacheFull, PagedKVCache, blocks_for
from gdsllm.engine.host_copies import HostCopies


def compute_dtype(device: torch.device, stored: str, qtypes: frozenset[str] = frozenset()) -> torch.dtype:
    """CPU: float32 math whatever the stored dtype (half-precision matmuls are slow and drift
    there); CUDA: the stored dtype, so no copy of the weights is made, except that a float16
    model with int4 weights computes in bfloat16: the int4 decode kernel (tinygemm,
    gdsllm.quant.kernels_cuda) takes bfloat16 only, and in float16 every matmul paid a cast of
    its input and of its output. Measured on an H200 (2026-12-03, benchmarks/profile_decode.py,
    the LLaMA-7B shape with 8 blocks, int4 in groups of 128, resident, batch 1): 2.19 and 2.50
    ms/token in float16 (two runs), 1.58 in bfloat16; the casts were 100 of 478 kernels a pass."""
    if torch.device(device).type == "cpu":
        return torch.float32
    if stored == "float16" and "int4" in qtypes:
        return torch.bfloat16
    return DTYPES[stored]


def reserve_scratch(device, dtype: torch.dtype, metas) -> int:
    """On CUDA, allocate the quantized matmuls' dequantization buffer and split-K counters now, at
    the VRAM ledger's size (gdsllm.engine.budget.scratch_bytes): before the KV cache is sized from
    the memory left, and before a CUDA graph is captured (a capture cannot allocate them).
    Returns their bytes."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    from gdsllm.engine.budget import dequant_numel, scratch_bytes
    from gdsllm.quant.kernels_cuda import scratch
    n = dequant_numel(metas)
    if not n:
        return 0
    from gdsllm.quant.triton_gemm import lock_buffer
    scratch(device, dtype, n)
    lock_buffer(device)
    return scratch_bytes(metas, torch.empty((), dtype=dtype).element_size())


def default_kv_tokens(params: LlamaParams) -> int:
    """Room for four sequences of the model's whole context (at most 32768 tokens)."""
    return min(4 * params.max_position_embeddings, 32768)


class Runner(ExpertSteps):
    def __init__(self, params: LlamaParams, device: str | torch.device, dtype: torch.dtype, *,
                 cudnn_attention: bool = False, architecture: str = "llama",
                 kv_tokens: int | None = None, cuda_graphs: bool = True, cpu_exact: bool = False,
                 cpu_compile: bool = False):
        """`cudnn_attention`: let torch pick SDPA's cuDNN kernel on CUDA (as transformers does);
        off by default, for its host cost (gdsllm.models.attention._CUDA_SDPA says what was
        measured). `kv_tokens`: the KV cache's size; `cuda_graphs`: replay decode passes over
        pinned units as CUDA graphs (CUDA only); `cpu_exact`: resident quantized weights as
        float32 copies on the CPU (float32 math, exact against the dequantized reference)
        instead of the faster packed forms that round activations to bfloat16
        (gdsllm.engine.host_copies); `cpu_compile`: on the CPU, decode a sequence through a
        LLaMA block compiled by torch.compile instead of the scripted one (both where its weights
        are in the packed forms: gdsllm.models.cpu_compiled; GDSLLM_CPU_COMPILE=0 runs every
        block eager)."""
        self.p, self.device, self.dtype = params, torch.device(device), dtype
        self.cudnn_attention = cudnn_attention
        self.family = family(architecture)
        self.layout = unit_layout(params)  # a MoE model's expert units go through run_expert
        p = params
        tokens = kv_tokens or default_kv_tokens(p)
        self.cache = PagedKVCache(p.num_hidden_layers, p.num_key_value_heads, p.head_dim, dtype,
                                  self.device, 1 + blocks_for(tokens))
        # Rotary frequencies depend only on the model: computed once, kept on the compute device;
        # one table per kind a layer uses ("global", and "local" for Gemma 3's sliding layers).
        kinds = sorted({p.layer_rope(i) for i in range(p.num_hidden_layers)})
        self.inv_freqs = {k: layers.rope_inv_freq(p, k).to(self.device) for k in kinds}
        # A mixture of experts routes on the host between its units: no graphs over its blocks.
        graphs = self.device.type == "cuda" and cuda_graphs and not p.num_experts
        self.graphs = DecodeGraphs(self) if graphs else None
        self.pinned: dict[int, dict] = {}  # unit index -> resident weights
        # CPU: pinned units run over copies made on first use (gdsllm.engine.host_copies).
        self.host_copies = HostCopies(dtype, exact=cpu_exact) if self.device.type == "cpu" else None
        cpu = self.device.type == "cpu"
        plain = self.family.decoder_block is llama.decoder_block and not p.num_experts
        self.compiled = CompiledBlocks(inductor=cpu_compile) if cpu and plain and not cpu_exact else None
        self._runs: dict[int, tuple[int, int]] | None = {}  # pinned_runs(), None: to recompute
        self._pass: PassState | None = None

    # -- sequences ------------------------------------------------------------------------------
    @property
    def sequences(self) -> set[int]:
        """Sequences holding KV-cache blocks."""
        return set(self.cache.tables)

    def seq_len(self, seq_id: int) -> int:
        """Tokens already in `seq_id`'s KV cache (0 for a sequence this runner does not know)."""
        return self.cache.length(seq_id)

    def release(self, seq_id: int) -> None:
        """Free `seq_id`'s KV cache; a no-op for an unknown id (e.g. cancelled before it ran)."""
        if self._pass is not None and seq_id in self._pass.seq_ids:
            raise RuntimeError(f"sequence {seq_id} released in the middle of a pass that serves it")
        self.cache.free(seq_id)

    def truncate(self, seq_id: int, n: int) -> None:
        """Roll `seq_id`'s KV cache back to its first `n` tokens (rejected draft tokens)."""
        if self._pass is not None and seq_id in self._pass.seq_ids:
            raise RuntimeError(f"sequence {seq_id} truncated in the middle of a pass that serves it")
        if n < self.seq_len(seq_id):
            self.cache.truncate(seq_id, n)

    def pin(self, unit: int, weights: dict) -> None:
        """Declare unit `unit` resident with these weights for the runner's lifetime: decode
        passes may run it inside a CUDA graph (its weights are then not read from run_unit)."""
        self.pinned[unit] = weights
        if self.host_copies is not None:
            self.host_copies.drop(unit)
        if self.compiled is not None and self.layout[unit][1] == "block":
            self.compiled.warm_up(self.p, weights)  # compiled at the first pinned block
        self._runs = None  # recomputed on the next graph replay; the graphs are stale
        if self.graphs is not None:
            self.graphs.clear()

    def pinned_runs(self) -> dict[int, tuple[int, int]]:
        """First unit of each run of consecutive pinned units -> (first, last)."""
        if self._runs is None:
            self._runs, first = {}, None
            for u in sorted(self.pinned):
                first = first if first is not None and u - 1 in self.pinned else u
                self._runs[first] = (first, u)
        return self._runs

    # -- passes ---------------------------------------------------------------------------------
    def compact(self, seq_id: int, start: int, keep: list[int]) -> None:
        """Keep `seq_id`'s tokens at cache indices `keep` (ascending, >= start) as start,
        start + 1, ... and forget the rest after start (a token tree's accepted path)."""
        if self._pass is not None and seq_id in self._pass.seq_ids:
            raise RuntimeError(f"sequence {seq_id} compacted in the middle of a pass that serves it")
        self.cache.compact(seq_id, start, keep)

    def assign(self, tables: dict[int, list[int]]) -> None:
        """Hand new sequences their KV block ids from the scheduler's books (gdsllm.engine.blocks)."""
        if self._pass is not None:
            raise RuntimeError("KV tables assigned in the middle of a pass")
        for sid, table in tables.items():
            self.cache.assign(sid, table)

    def start_pass(self, chunks: list[tuple[int, list[int]]], all_logits: bool = False, *,
                   logit_rows: dict[int, int] | None = None,
                   tables: dict[int, list[int]] | None = None, trees: dict | None = None) -> None:
        """Begin one weight pass for `chunks`: (seq_id, new_token_ids) each, seq_ids distinct.
        `all_logits`: end_pass returns logits for every new token, not only each chunk's last;
        `logit_rows[seq_id] = n`: logits for the last n tokens of that chunk (default 1).
        `tables[seq_id]`: the KV block ids of a sequence new to the cache, from the scheduler's
        books (gdsllm.engine.blocks); without them the cache allocates its own blocks.
        `trees[seq_id]`: a gdsllm.engine.tree.TreeSpec covering the sequence's cache from its
        start to the end of this chunk (tree attention; never a decode pass)."""
        if self._pass is not None:
            raise RuntimeError("start_pass called while a pass is in progress (call end_pass first)")
        if not chunks:
            raise ValueError("start_pass: empty batch")
        p = self.p
        seq_ids = [sid for sid, _ in chunks]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"start_pass: a sequence appears twice in one batch: {seq_ids}")
        chunks = [(sid, list(toks)) for sid, toks in chunks]
        rows_of = {}
        for sid, toks in chunks:
            if not toks:
                raise ValueError(f"sequence {sid}: no new tokens")
            bad = [t for t in toks if not isinstance(t, int) or not 0 <= t < p.vocab_size]
            if bad:
                raise ValueError(f"sequence {sid}: token ids {bad[:5]} are outside the vocabulary "
                                 f"[0, {p.vocab_size})")
            past = self.seq_len(sid)
            if past + len(toks) > p.max_position_embeddings:
                raise ValueError(f"sequence {sid}: {past} cached + {len(toks)} new tokens exceed the "
                                 f"model's context of {p.max_position_embeddings} tokens")
            n_rows = (logit_rows or {}).get(sid, 1)
            if not 1 <= n_rows <= len(toks):
                raise ValueError(f"sequence {sid}: {n_rows} logit rows asked of a {len(toks)}-token chunk")
            rows_of[sid] = len(toks) if all_logits else n_rows
        self.assign(tables or {})
        for sid, spec in (trees or {}).items():
            if sid not in rows_of:
                raise ValueError(f"start_pass: a tree for sequence {sid}, which is not in the batch")
            spec.check(sid, self.seq_len(sid) + len(chunks[seq_ids.index(sid)][1]))
        new = [sid for sid in seq_ids if sid not in self.cache]
        try:
            for sid, toks in chunks:
                self.cache.grow(sid, len(toks))
        except KVCacheFull:
            for sid in new:
                self.cache.free(sid)
            raise
        decode = not trees and all(len(toks) == 1 and rows_of[sid] == 1 for sid, toks in chunks)
        if decode and self.device.type != "cpu":
            self._pass = decode_pass(self, chunks)
        else:  # on the CPU decode too: SDPA per sequence over its keys, found once per pass
            self._pass = chunked_pass(self, chunks, rows_of, trees)

    def rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {k: layers.rope_cos_sin(f, positions, self.dtype) for k, f in self.inv_freqs.items()}

    def run_unit(self, unit: UnitMeta, weights: dict[str, torch.Tensor]) -> None:
        """Run the next unit of the pass with its weights (views valid until the caller fences)."""
        ps = self._pass
        if ps is None:
            raise RuntimeError(f"run_unit({unit.name}) outside a pass (call start_pass first)")
        i = ps.next_unit
        if ps.moe is not None:  # the previous block was a mixture of experts: its experts ran
            ps.x, ps.moe = ps.moe.output(), None
            while i < len(self.layout) and self.layout[i][1] == "expert":
                i += 1
            ps.next_unit = i
        if i >= len(self.layout) or (unit.name, unit.kind, unit.layer) != self.layout[i]:
            want = self.layout[i][0] if i < len(self.layout) else "end_pass"
            raise RuntimeError(f"run_unit: got unit {unit.name}, expected {want}")
        ps.next_unit += 1
        if i <= ps.replayed_through:  # ran inside the graph of its pinned run
            return
        st = ps.static
        if st is not None and i in self.pinned_runs():
            first, last = self._runs[i]
            if ps.x is not None and ps.x is not st.x:
                st.x.copy_(ps.x)
            self.graphs.replay((first, last), st, lambda: self._run_static(first, last, st))
            ps.replayed_through = last
            ps.x, ps.logits = st.x, (st.logits if self.layout[last][1] == "head" else None)
            return
        if self.host_copies is not None and self.pinned.get(unit.index) is weights:
            weights = self.host_copies.weights(unit.index, weights)
        self._forward(i, weights, ps)

    def _run_static(self, first: int, last: int, st: Static) -> None:
        """Pinned units first..last over a bucket's static buffers (what a graph captures)."""
        ps = PassState([], st.ids, st.rope, st.batch, None, [], st)
        ps.x = st.x
        for u in range(first, last + 1):
            self._forward(u, self.pinned[u], ps)
        if ps.logits is not None:
            st.logits.copy_(ps.logits)
        else:
            st.x.copy_(ps.x)

    def _forward(self, i: int, weights: dict, ps: PassState) -> None:
        p = self.p
        _, kind, layer = self.layout[i]
        if kind == "embed":
            ps.x = layers.embed(weights, ps.ids, self.dtype, p.embed_scale)
            ps.embedding = weights["embed_tokens.weight"]
        elif kind == "block" and p.num_experts:  # attention + router; the experts follow (run_expert)
            cos, sin = ps.rope[p.layer_rope(layer)]
            ps.moe = self.family.route(p, weights, ps.x, cos, sin, ps.batch, layer, self.cudnn_attention)
            ps.x = None
        elif kind == "block":
            cos, sin = ps.rope[p.layer_rope(layer)]
            if self.compiled is not None:  # None where it does not cover the block: eager
                y = self.compiled.decoder_block(p, weights, ps.x, cos, sin, ps.batch, layer)
                if y is not None:
                    ps.x = y
                    return
            ps.x = self.family.decoder_block(p, weights, ps.x, cos, sin, ps.batch, layer,
                                             self.cudnn_attention)
        else:
            if "lm_head.weight" not in weights:  # tied, stored once: the head is the embedding
                if not p.tie_word_embeddings:
                    raise RuntimeError(f"unit {self.layout[i][0]} has no lm_head.weight and the "
                                       f"model is not tied")
                emb = ps.embedding if ps.embedding is not None else self.pinned[0]["embed_tokens.weight"]
                weights = {**weights, "lm_head.weight": emb}
            # Only the rows asked for (each chunk's last token by default): norm + LM head on those.
            x = ps.x if ps.last_rows is None else ps.x.index_select(0, ps.last_rows)
            ps.logits = self.family.lm_head(p, weights, x)
            ps.embedding = None

    def fence(self) -> None:
        """Wait until all work issued so far has finished (weights' buffers may then be reused)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def end_pass(self) -> torch.Tensor:
        """Finish the pass: commit the new tokens to the KV cache; float32 logits [rows, vocab]
        (one row per chunk, or logit_rows[seq_id] rows for those asked, in chunk order)."""
        ps = self._pass
        if ps is None:
            raise RuntimeError("end_pass without start_pass")
        if ps.next_unit != len(self.layout):
            raise RuntimeError(f"end_pass after {ps.next_unit} of {len(self.layout)} units")
        for sid, n in ps.commit:
            self.cache.advance(sid, n)
        self._pass = None
        assert ps.logits is not None and ps.logits.dtype == torch.float32
        if ps.static is not None:  # a bucket's buffer: the padding rows go, the next pass reuses it
            return ps.logits[: len(ps.seq_ids)].clone()
        return ps.logits

    def abort_pass(self) -> None:
        """Drop a pass that failed midway; the cache keeps only what earlier passes committed."""
        self._pass = None
