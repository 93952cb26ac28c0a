"""Speculative decoding: a resident draft proposes up to K tokens per sequence, the (streamed) target
scores them all in ONE weight pass, and the longest acceptable prefix is kept.

    spec = Speculator(DraftModel(draft_dir), target_context=meta.params.max_position_embeddings)
    chunks, rows = spec.plan(chunks, ks={seq_id: 4}, samplers={seq_id: sampler})
    logits = run_target_pass(chunks, logit_rows=rows)       # Runner.start_pass(chunks, rows) ...
    out = spec.finish(logits, samplers, target_runner)      # {seq_id: [new tokens, in order]}
    spec.release(seq_id)
    # or, when the pass is a function call: out = spec.step(run_pass, chunks, ks, samplers, runner)

For each sequence with k > 0 the target's chunk is its new tokens followed by the k drafts, and
logits come back for the last k + 1 positions: row i scores draft i, row k the token after them.
Greedy requests keep the drafts while they equal the target's argmax, then the target's own
argmax (`accept_greedy`): the output is token for token the output without a draft. Sampled
requests follow the speculative-sampling rule of Leviathan et al. and Chen et al. (2023)
(`accept_sampled`): draft d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
the first rejection is replaced by a draw from normalize(max(0, p_i - q_i)); when every draft is
accepted one more token is drawn from p_k. Each emitted token is then distributed exactly as the
target's own sampler would draw it (p: the target's distribution after temperature, top-k and
top-p), all draws from the request's seeded generator. Rejected positions are rolled back from
both KV caches. Sequences with k = 0 share the pass and are sampled as without a draft.
With `adaptive=True` each sequence drafts only as many of its k as pay off, by its recent
acceptance and the measured cost of a draft pass against a target pass (gdsllm.engine.adaptive_k).
Seeded sampled requests keep their k: the tokens a seed gives must not depend on timings (which
draws happen depends on k; their distribution never does).

Token trees (`tree=T`, or per sequence `plan(..., trees={seq_id: T})`; gdsllm.engine.tree): the
draft proposes a tree of T nodes at most k deep instead of a chain, the target scores every node
in the same one pass with tree attention, and the longest path it agrees with is kept: its keys
and values are compacted behind the prefix (`Runner.compact`), the other branches dropped.
`plan` then also fills `trees` {seq_id: TreeSpec}, which the pass needs
(`runner.start_pass(chunks, logit_rows=rows, trees=spec.trees)`). `tree="auto"` sizes each tree
from the measured target pass costs (gdsllm.engine.adaptive_k.tree_size: large when a pass's
time hardly grows with its tokens, as when its weights stream). T = 0 (the
default) keeps the chain.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gdsllm.engine.adaptive_k import AdaptiveK, tree_size
from gdsllm.engine.draft import (DraftModel, NgramDraft, Proposal, SelfDraft, check_draft, is_builtin,
                                 is_ngram, self_layers)
from gdsllm.engine.sampling import AUTO_TREE, Sampler, SamplingError, check_draft_tokens, check_draft_tree
from gdsllm.models.kv_cache import blocks_for
from gdsllm.engine.tree import Calibration, TreeSpec, accept_tree_greedy, accept_tree_sampled, depths



def make_speculator(target_meta, draft, device, draft_tokens: int = 4, adaptive: bool = False,
                    kv_tokens: int | None = None, tree=None) -> "Speculator":
    """The draft at path `draft` loaded resident on `device`, checked against the target, or
    prompt lookup for `draft="ngram"` (gdsllm.engine.draft.NgramDraft), or the target's own
    first N layers for `draft="self:N"` (gdsllm.engine.draft.SelfDraft: `Speculator.attach` the
    target's runner once its units are pinned); `adaptive`: K per sequence within [1, its k]
    (gdsllm.engine.adaptive_k); `kv_tokens`: the target's KV cache size (the draft holds the same
    sequences); `tree`: token-tree nodes per pass (None / 0: chains; "auto")."""
    from pathlib import Path

    from gdsllm.format.metadata import load_model_meta
    check_draft_tokens(draft_tokens)
    tree = check_draft_tree(tree)
    if is_ngram(draft):
        source = NgramDraft(target_meta.params.vocab_size)
    elif self_layers(draft) is not None:
        source = SelfDraft(target_meta, self_layers(draft), device, kv_tokens)
    else:
        meta = load_model_meta(Path(draft).expanduser())
        check_draft(target_meta, meta)
        source = DraftModel(meta, device, kv_tokens)
    return Speculator(source, target_meta.params.max_position_embeddings, adaptive=adaptive, tree=tree)


def load_draft_meta(target_meta, draft):
    """The draft model at path `draft`, checked against the target (ValueError naming both on a
    mismatch); its bytes are the VRAM ledger's first claim (gdsllm.engine.budget.plan_memory).
    None for `ngram` (prompt lookup: no model, no bytes) and `self:N` (the target's own weights;
    N is checked here)."""
    from pathlib import Path

    from gdsllm.format.metadata import load_model_meta
    n = self_layers(draft)
    if n is not None and not 1 <= n < target_meta.params.num_hidden_layers:
        raise ValueError(f"--draft self:{n}: N must be 1 to {target_meta.params.num_hidden_layers - 1} "
                         f"(the target has {target_meta.params.num_hidden_layers} decoder layers)")
    if is_builtin(draft):
        return None
    meta = load_model_meta(Path(draft).expanduser())
    check_draft(target_meta, meta)
    return meta


def accept_greedy(rows: torch.Tensor, drafts: list[int]) -> list[int]:
    """rows [k+1, vocab]: the drafts that equal the target's argmax, then the target's argmax."""
    best = rows.argmax(-1).tolist()
    j = 0
    while j < len(drafts) and drafts[j] == best[j]:
        j += 1
    return drafts[:j] + [best[j]]


def accept_sampled(rows: torch.Tensor, drafts: list[int], q: list[torch.Tensor],
                   sampler: Sampler) -> list[int]:
    """rows [k+1, vocab] target logits; q[i] the draft distribution d_i was drawn from."""
    p = sampler.probs(rows)
    for i, d in enumerate(drafts):
        qi, pi = q[i].to(p.device), p[i]
        if sampler.uniform(p.device) * float(qi[d]) < float(pi[d]):  # u < p(d) / q(d)
            continue
        residual = (pi - qi).clamp_min(0)
        mass = float(residual.sum())
        # mass == 0 only where p == q to rounding, when the draft is accepted with probability 1
        return drafts[:i] + [sampler.draw(residual / mass if mass > 0 else pi)]
    return drafts + [sampler.draw(p[len(drafts)])]


@dataclass
class SpecStats:
    """Counts since start: tokens drafted, drafts accepted, target passes that verified a draft
    (per sequence), the tokens those passes produced and the (batched) draft passes run."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_passes: int = 0
    tokens: int = 0
    draft_passes: int = 0
    tree_passes: int = 0  # target passes (per sequence) that verified a token tree
    tree_nodes: int = 0  # the nodes of those trees
    draft_seconds: float = 0.0  # spent drafting (plan), all steps
    steps: int = 0  # plans that drafted anything

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0


class Speculator:
    def __init__(self, draft: DraftModel, target_context: int, adaptive: bool = False, tree=None):
        self.draft, self.target_context = draft, target_context
        self.adaptive = AdaptiveK() if adaptive else None
        self.tree = check_draft_tree(tree)
        self._timer = self.adaptive if self.adaptive is not None else AdaptiveK()  # the cost ratio
        self.trees: dict[int, TreeSpec] = {}  # of the pass in flight: what start_pass needs
        self._target = None  # the target's Runner (attach): trees fit its free KV blocks
        self.last_draft_seconds = 0.0  # the last plan's drafting time
        self._t_plan: tuple[float, int, float, int] | None = None  # (draft s, draft passes, plan end,
        # the target pass's tokens)
        self.hist: dict[int, list[int]] = {}  # per sequence: the tokens fed to the target
        self.stats = SpecStats()
        self.calibration = Calibration()  # tree scores from the verified trees' acceptance by rank
        self._order: list[int] = []
        self._rows: dict[int, int] = {}
        self.proposals: dict[int, Proposal] = {}  # of the pass in flight

    def attach(self, target, experts=None) -> None:
        """The target's runner, once its resident units are pinned: a self:N draft reads its
        weights there (gdsllm.engine.draft.SelfDraft.attach); other drafts need nothing."""
        self._target = target
        if isinstance(self.draft, SelfDraft):
            self.draft.attach(target, experts)

    def assign(self, tables: dict[int, list[int]]) -> None:
        """New sequences' KV block ids from the scheduler's books, for the draft as for the target."""
        self.draft.assign(tables)

    def _fit_trees(self, chunks, ks: dict[int, int], sizes: dict[int, int]) -> None:
        """Shrink the trees to the target's free KV blocks, after what every chunk of the pass
        and its chain drafts need (a tree borrows blocks for one pass: Runner.compact returns
        them), so that a tree never makes the pass run out of KV cache."""
        cache = self._target.cache
        free, slack = cache.free_blocks, {}
        for sid, new in chunks:
            need, slack[sid] = cache.room(sid, len(new) + (0 if sid in sizes else ks.get(sid, 0)))
            free -= need
        for sid in [sid for sid, _ in chunks if sid in sizes]:
            t = min(sizes[sid], slack[sid] + max(0, free) * cache.block_size)
            free -= blocks_for(max(0, t - slack[sid]), cache.block_size)
            if t > 0:
                sizes[sid] = t
            else:
                del sizes[sid]

    def pass_cost(self) -> tuple[float, float] | None:
        """(a, b): a target pass of n tokens has taken about a + b * n seconds (what `"auto"` trees
        are sized from: gdsllm.engine.adaptive_k); None until measured."""
        return self._timer.pass_cost()

    def tree_size(self, requested, timed: bool = True) -> int:
        """Nodes of a sequence's tree this pass: its request's draft_tree (None: the
        speculator's), "auto" from the measured costs (`timed`; else the untimed default: a
        seed's tokens must not depend on timings); 0: a chain."""
        t = self.tree if requested is None else requested
        if t == AUTO_TREE:
            return tree_size(self._timer.ratio, self._timer.pass_cost()) if timed else tree_size(None)
        return t or 0

    def plan(self, chunks: list[tuple[int, list[int]]], ks: dict[int, int],
             samplers: dict[int, Sampler], trees: dict[int, int | str | None] | None = None
             ) -> tuple[list[tuple[int, list[int]]], dict[int, int]]:
        """Draft up to ks[seq_id] tokens per sequence (a chain, or a tree of trees[seq_id] nodes
        at most that deep: None there, the speculator's `tree`); the target's chunks and logit
        rows. `self.trees` then holds the TreeSpec of each sequence that drafted a tree."""
        items, sizes = [], {}
        for sid, new in chunks:
            h = self.hist.setdefault(sid, [])
            h.extend(new)
            k = min(ks.get(sid, 0), self.target_context - len(h),  # the target holds len(h) + k
                    self.draft.max_context - len(h) + 1)  # the draft len(h) + k - 1
            p = samplers[sid].params
            timed = p.greedy or p.seed is None
            if self.adaptive is not None and timed:
                k = self.adaptive.k(sid, k)
            if k > 0:
                items.append((sid, h, k, samplers[sid]))
                t = min(self.tree_size((trees or {}).get(sid), timed), self.target_context - len(h),
                        self.draft.max_context - len(h))
                if t > 0:
                    sizes[sid] = t
        if sizes and self._target is not None:
            self._fit_trees(chunks, ks, sizes)
        t0, n0 = time.perf_counter(), self.draft.passes
        chain = [it for it in items if it[0] not in sizes]
        self.proposals = self.draft.propose(chain) if chain else {}
        if sizes:  # seeded requests: trees from the draft alone (not from other requests' outcomes)
            cal = {sid: self.calibration for sid in sizes
                   if samplers[sid].params.greedy or samplers[sid].params.seed is None}
            self.proposals.update(self.draft.propose_tree([it for it in items if it[0] in sizes],
                                                          sizes, cal))
        t1 = time.perf_counter()
        out = [(sid, list(new) + (self.proposals[sid].tokens if sid in self.proposals else []))
               for sid, new in chunks]
        self._t_plan = (t1 - t0, self.draft.passes - n0, t1, sum(len(c) for _, c in out)) if items else None
        self.last_draft_seconds = t1 - t0 if items else 0.0
        if items:
            self.stats.draft_seconds += t1 - t0
            self.stats.steps += 1
        self.trees = {sid: TreeSpec(len(self.hist[sid]), p.parents)
                      for sid, p in self.proposals.items() if p.parents is not None}
        self._order = [sid for sid, _ in chunks]
        self._rows = {sid: len(p.tokens) + 1 for sid, p in self.proposals.items()}
        return out, dict(self._rows)

    def finish(self, logits: torch.Tensor, samplers: dict[int, Sampler], target, skip=(),
               failed: dict[int, str] | None = None) -> dict[int, list[int]]:
        """The new tokens of each sequence of the pass from its logits (rows as `plan` asked);
        rolls back rejected drafts in `target` (its Runner) and in the draft. Sequences in `skip`
        (mid-prompt chunks of a chunked prefill, never drafted) get no token. A sequence whose
        logits cannot be sampled gets none either: it goes into `failed` (seq_id -> why), or
        raises SamplingError when `failed` is None."""
        spans, row = {}, 0
        for sid in self._order:
            n = self._rows.get(sid, 1)
            spans[sid] = (row, row + n)
            row += n
        assert row == logits.shape[0], (row, logits.shape)
        plain = [sid for sid in self._order if sid not in self.proposals and sid not in skip]
        out: dict[int, list[int]] = {}
        if plain:
            last = torch.tensor([spans[s][1] - 1 for s in plain], device=logits.device)
            picks, bad = Sampler.sample_rows(logits.index_select(0, last), [samplers[s] for s in plain])
            _failures(failed, {plain[j]: why for j, why in bad.items()})
            out.update((s, [t]) for j, (s, t) in enumerate(zip(plain, picks)) if j not in bad)
        st = self.stats
        for sid, prop in self.proposals.items():
            a, b = spans[sid]
            s = samplers[sid]
            try:
                if prop.parents is not None:
                    accept = accept_tree_greedy if s.params.greedy else accept_tree_sampled
                    path, toks = accept(logits[a:b], prop.tokens, prop.parents,
                                        *(() if s.params.greedy else (s,)))
                else:
                    toks = (accept_greedy(logits[a:b], prop.tokens) if s.params.greedy
                            else accept_sampled(logits[a:b], prop.tokens, prop.probs, s))
            except RuntimeError as e:  # torch.multinomial on NaN: this sequence only
                _failures(failed, {sid: f"sampling failed: {e}"})
                continue
            out[sid] = toks
            h = self.hist[sid]
            start = len(h)
            h.extend(toks[:-1])  # accepted drafts are in the target's cache; the last token is not
            if prop.parents is not None:  # the path's keys and values behind the prefix
                target.compact(sid, start, [start + i for i in path])
                self.draft.keep(sid, start, path)
                if prop.tops is not None and (s.params.greedy or s.params.seed is None):
                    for node, tok in zip([-1] + path, toks):  # toks[i]: the target's after node i
                        if node in prop.tops:
                            q, ids = prop.tops[node]
                            hit = torch.nonzero(ids == tok).reshape(-1)
                            self.calibration.observe_top(q, int(hit[0]) + 1 if hit.numel() else None)
                st.tree_passes += 1
                st.tree_nodes += len(prop.tokens)
                drafted = 1 + max(depths(prop.parents), default=-1)
            else:
                target.truncate(sid, len(h))
                self.draft.truncate(sid, len(h))
                drafted = len(prop.tokens)
            st.draft_tokens += len(prop.tokens)
            st.accepted_tokens += len(toks) - 1
            st.target_passes += 1
            st.tokens += len(toks)
            if self.adaptive is not None:
                self.adaptive.observe(sid, drafted, len(toks) - 1)
        if self._t_plan is not None:
            draft_s, passes, plan_end, tokens = self._t_plan
            self._timer.timing(draft_s, passes, time.perf_counter() - plan_end, tokens)
        st.draft_passes += self._t_plan[1] if self._t_plan else 0
        self._t_plan = None
        self.proposals, self.trees = {}, {}
        return {sid: out[sid] for sid in self._order if sid in out}

    def abort(self, target) -> None:
        """The target pass failed: forget its chunks (hist back to what `target` holds)."""
        for sid in self._order:
            h = self.hist.get(sid)
            if h is not None:
                del h[target.seq_len(sid):]
                self.draft.truncate(sid, len(h))
        self.proposals, self._t_plan, self.trees = {}, None, {}

    def step(self, run_pass, chunks, ks, samplers, target, trees=None) -> dict[int, list[int]]:
        """plan, `run_pass(chunks, logit_rows=[, trees=]) -> logits`, finish: one speculative
        step (`trees` as plan's; run_pass gets trees= only when some sequence drafted a tree)."""
        chunks, rows = self.plan(chunks, ks, samplers, trees)
        try:
            logits = (run_pass(chunks, logit_rows=rows, trees=self.trees) if self.trees
                      else run_pass(chunks, logit_rows=rows))
        except BaseException:
            self.abort(target)
            raise
        return self.finish(logits, samplers, target)

    def release(self, seq_id: int) -> None:
        self.hist.pop(seq_id, None)
        if self.adaptive is not None:
            self.adaptive.release(seq_id)
        self.draft.release(seq_id)


def _failures(failed: dict[int, str] | None, new: dict[int, str]) -> None:
    if new and failed is None:
        raise SamplingError(next(iter(new.values())))
    if new:
        failed.update(new)


def pass_tokens(logits, seq_ids: list[int], partial: set[int], samplers: dict, speculator, runner):
    """The tokens a finished pass gives: (tokens [(seq_id, token)], accepted {seq_id: drafts the
    target accepted, which come before its token}, proposed {seq_id: drafts proposed}, failed
    {seq_id: why its logits could not be sampled}: those get no token, the others go on).
    Sequences in `partial` (mid-prompt chunks) get nothing; `speculator` may be None."""
    failed: dict[int, str] = {}
    if speculator is not None:
        proposed = {sid: len(p.tokens) for sid, p in speculator.proposals.items()}
        out = speculator.finish(logits, samplers, runner, skip=partial, failed=failed)
        ends = [sid for sid in seq_ids if sid not in partial and sid not in failed]
        return ([(sid, out[sid][-1]) for sid in ends],
                {sid: out[sid][:-1] for sid in proposed if sid not in failed}, proposed, failed)
    ends = [sid for sid in seq_ids if sid not in partial]
    if len(ends) < len(seq_ids):  # mid-prompt chunks sample nothing
        logits = logits[[i for i, sid in enumerate(seq_ids) if sid not in partial]]
    picks, bad = Sampler.sample_rows(logits, [samplers[sid] for sid in ends]) if ends else ([], {})
    failed.update((ends[j], why) for j, why in bad.items())
    return [(sid, t) for j, (sid, t) in enumerate(zip(ends, picks)) if j not in bad], {}, {}, failed
