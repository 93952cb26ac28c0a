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
rolls its KV cache back to its first n tokens (rejected draft tokens).

A tied model stored once has no LM head in its head unit: the head multiplies by the embedding
table the embed unit of the same pass was given, so that unit's buffer must still hold it when the
head runs (gdsllm.engine.planner.plan_for keeps it resident).

This interface is what the compute worker process codes against; keep its names and meaning.
"""
from __future__ import annotations

import torch

from gdsllm.models import family, layers
from gdsllm.format.metadata import DTYPES, LlamaParams, UnitMeta, unit_layout
from gdsllm.engine.kv_cache import KVCache


def compute_dtype(device: torch.device, stored: str) -> torch.dtype:
    """CPU: float32 math whatever the stored dtype (half-precision matmuls are slow and drift
    there); CUDA: the stored dtype, so no copy of the weights is made."""
    return torch.float32 if torch.device(device).type == "cpu" else DTYPES[stored]


class Runner:
    def __init__(self, params: LlamaParams, device: str | torch.device, dtype: torch.dtype, *,
                 cudnn_attention: bool = False, architecture: str = "llama"):
        """`cudnn_attention`: let torch pick SDPA's cuDNN kernel on CUDA (as transformers does);
        off by default, for its host cost (gdsllm.models.layers._CUDA_SDPA says what was measured)."""
        self.p, self.device, self.dtype = params, torch.device(device), dtype
        self.cudnn_attention = cudnn_attention
        self.family = family(architecture)
        # The units run_unit takes; a MoE model's expert units go through run_expert instead.
        self.layout = [u for u in unit_layout(params) if u[1] != "expert"]
        self.caches: dict[int, KVCache] = {}
        # Rotary frequencies depend only on the model: computed once, kept on the compute device;
        # one table per kind a layer uses ("global", and "local" for Gemma 3's sliding layers).
        self.windows = [params.layer_window(i) for i in range(params.num_hidden_layers)]
        kinds = sorted({params.layer_rope(i) for i in range(params.num_hidden_layers)})
        self.inv_freqs = {k: layers.rope_inv_freq(params, k).to(self.device) for k in kinds}
        self._pass: _Pass | None = None

    def seq_len(self, seq_id: int) -> int:
        """Tokens already in `seq_id`'s KV cache (0 for a sequence this runner does not know)."""
        c = self.caches.get(seq_id)
        return 0 if c is None else c.length

    def release(self, seq_id: int) -> None:
        """Free `seq_id`'s KV cache; a no-op for an unknown id (e.g. cancelled before it ran)."""
        if self._pass is not None and seq_id in self._pass.seq_ids:
            raise RuntimeError(f"sequence {seq_id} released in the middle of a pass that serves it")
        self.caches.pop(seq_id, None)

    def truncate(self, seq_id: int, n: int) -> None:
        """Roll `seq_id`'s KV cache back to its first `n` tokens (rejected draft tokens)."""
        if self._pass is not None and seq_id in self._pass.seq_ids:
            raise RuntimeError(f"sequence {seq_id} truncated in the middle of a pass that serves it")
        if n < self.seq_len(seq_id):
            self.caches[seq_id].truncate(n)

    def start_pass(self, chunks: list[tuple[int, list[int]]], all_logits: bool = False, *,
                   logit_rows: dict[int, int] | None = None) -> None:
        """Begin one weight pass for `chunks`: (seq_id, new_token_ids) each, seq_ids distinct.
        `all_logits`: end_pass returns logits for every new token, not only each chunk's last;
        `logit_rows[seq_id] = n`: logits for the last n tokens of that chunk (default 1)."""
        if self._pass is not None:
            raise RuntimeError("start_pass called while a pass is in progress (call end_pass first)")
        if not chunks:
            raise ValueError("start_pass: empty batch")
        p = self.p
        seq_ids = [sid for sid, _ in chunks]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"start_pass: a sequence appears twice in one batch: {seq_ids}")
        ids, positions, segments, last_rows, row = [], [], [], [], 0
        for sid, toks in chunks:
            toks = list(toks)
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
            ids += toks
            positions += range(past, past + len(toks))
            n_rows = (logit_rows or {}).get(sid, 1)
            if not 1 <= n_rows <= len(toks):
                raise ValueError(f"sequence {sid}: {n_rows} logit rows asked of a {len(toks)}-token chunk")
            segments.append((sid, row, row + len(toks)))
            n_rows = len(toks) if all_logits else n_rows
            last_rows += range(row + len(toks) - n_rows, row + len(toks))
            row += len(toks)
        for sid, _, _ in segments:
            if sid not in self.caches:  # a new sequence starts at position 0
                self.caches[sid] = KVCache(p.num_hidden_layers, p.num_key_value_heads, p.head_dim,
                                           self.dtype, self.device, p.max_position_embeddings,
                                           windows=self.windows)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        self._pass = _Pass(
            seq_ids=seq_ids,
            ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            rope={k: layers.rope_cos_sin(f, pos, self.dtype) for k, f in self.inv_freqs.items()},
            segments=[layers.Segment(a, b, self.caches[sid]) for sid, a, b in segments],
            last_rows=torch.tensor(last_rows, dtype=torch.long, device=self.device))

    def run_unit(self, unit: UnitMeta, weights: dict[str, torch.Tensor]) -> None:
        """Run the next unit of the pass with its weights (views valid until the caller fences)."""
        ps = self._pass
        if ps is None:
            raise RuntimeError(f"run_unit({unit.name}) outside a pass (call start_pass first)")
        if ps.next_unit >= len(self.layout) or (unit.name, unit.kind, unit.layer) != self.layout[ps.next_unit]:
            want = self.layout[ps.next_unit][0] if ps.next_unit < len(self.layout) else "end_pass"
            raise RuntimeError(f"run_unit: got unit {unit.name}, expected {want}")
        p = self.p
        if ps.moe is not None:  # the previous block was a mixture of experts: its experts ran
            ps.x, ps.moe = ps.moe.output(), None
        if unit.kind == "embed":
            ps.x = layers.embed(weights, ps.ids, self.dtype, p.embed_scale)
            ps.embedding = weights["embed_tokens.weight"]
        elif unit.kind == "block":
            cos, sin = ps.rope[p.layer_rope(unit.layer)]
            if p.num_experts:  # attention + router; the routed experts follow (run_expert)
                ps.moe = self.family.route(p, weights, ps.x, cos, sin, ps.segments, unit.layer,
                                           self.cudnn_attention)
                ps.x = None
            else:
                ps.x = self.family.decoder_block(p, weights, ps.x, cos, sin, ps.segments,
                                                 unit.layer, self.cudnn_attention)
        else:
            if "lm_head.weight" not in weights:  # tied, stored once: the head is the embedding
                if not p.tie_word_embeddings:
                    raise RuntimeError(f"unit {unit.name} has no lm_head.weight and the model is not tied")
                weights = {**weights, "lm_head.weight": ps.embedding}
            # Only the rows asked for (each chunk's last token by default): norm + LM head on those.
            ps.logits = self.family.lm_head(p, weights, ps.x.index_select(0, ps.last_rows))
            ps.x = ps.embedding = None
        ps.next_unit += 1

    def routed_experts(self) -> list[int]:
        """The experts the MoE block just run routed any token of the pass to (ascending); each
        must go through `run_expert` before the next unit runs."""
        if self._pass is None or self._pass.moe is None:
            raise RuntimeError("routed_experts: no mixture-of-experts block is waiting for its experts")
        return self._pass.moe.experts()

    @property
    def pending_routing(self):
        """The gdsllm.models.moe.Routing of the MoE block waiting for its experts, or None."""
        return None if self._pass is None else self._pass.moe

    def run_expert(self, unit: UnitMeta, weights: dict[str, torch.Tensor]) -> None:
        """Run expert unit `unit` ("block.i.expert.j") of the waiting MoE block over its rows."""
        ps = self._pass
        if ps is None or ps.moe is None or unit.kind != "expert" or \
                self.layout[ps.next_unit - 1][2] != unit.layer:
            raise RuntimeError(f"run_expert({unit.name}): its block is not waiting for experts")
        ps.moe.add(unit.expert, weights)

    def fence(self) -> None:
        """Wait until all work issued so far has finished (weights' buffers may then be reused)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def end_pass(self) -> torch.Tensor:
        """Finish the pass: commit the new tokens to the KV caches; float32 logits [rows, vocab]
        (one row per chunk, or logit_rows[seq_id] rows for those asked, in chunk order)."""
        ps = self._pass
        if ps is None:
            raise RuntimeError("end_pass without start_pass")
        if ps.next_unit != len(self.layout):
            raise RuntimeError(f"end_pass after {ps.next_unit} of {len(self.layout)} units")
        for seg in ps.segments:
            seg.cache.advance(seg.end - seg.start)
        self._pass = None
        assert ps.logits is not None and ps.logits.dtype == torch.float32
        return ps.logits

    def abort_pass(self) -> None:
        """Drop a pass that failed midway; caches keep only what earlier passes committed."""
        self._pass = None


class _Pass:
    """State of the pass in flight: inputs, per-sequence segments, running activations."""

    def __init__(self, seq_ids, ids, rope, segments, last_rows):
        self.seq_ids, self.ids, self.rope = seq_ids, ids, rope  # rope: kind -> (cos, sin)
        self.segments, self.last_rows = segments, last_rows
        self.x: torch.Tensor | None = None
        self.embedding: torch.Tensor | None = None  # the embed unit's table, for a tied head
        self.logits: torch.Tensor | None = None
        self.moe = None  # gdsllm.models.moe.Routing of a MoE block waiting for its experts
        self.next_unit = 0
