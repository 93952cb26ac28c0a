"""Token trees for speculative decoding: a draft proposes a tree of continuations, the target
scores every node in one pass, the longest path it agrees with is kept (SpecInfer, SpecExec).

    spec = TreeSpec(start=len(tokens), parents=[-1, -1, 0, 2])  # node i's parent (-1: the root)
    runner.start_pass([(sid, [root] + tree_tokens)], logit_rows={sid: 5}, trees={sid: spec})
    path, toks = accept_tree_greedy(logits, tree_tokens, spec.parents)
    runner.compact(sid, spec.start, [spec.start + i for i in path])  # rejected branches dropped

The KV cache holds a sequence's tree after its prefix: node i at cache index start + i (parents
come before their children), at rotary position start + depth(i). `tree_visibility` says which
keys each node sees: the prefix (cache indices below `start`) and its own ancestors, itself
included; the other branches never. Once the target chose a path, `PagedKVCache.compact` moves
the path's keys and values to start, start + 1, ... (their positions already) and forgets the rest.

Drafts build trees best first (`TreeBuilder`, SpecExec): every node carries the cumulative
log-probability of its path; the T likeliest nodes form the tree (a node's children are never
likelier than it, so those T are closed under parents), and only nodes whose children could still
enter the T best are expanded, one batched draft pass per level. A node's probability is the
draft's own until trees have been verified, then the acceptance measured for children of its rank
and draft probability (`Calibration`, Sequoia's acceptance vector, measured at every rank of the
draft's top 4096 whether a tree held it or not): a draft whose confident top
token is often wrong (an untrained early exit) gets wide trees, a calibrated one deep trees.

Acceptance: greedy walks from the root while a child carries the target's argmax (the output is
the output without a draft, token for token). Sampled requests use SpecInfer's multi-step
speculative sampling with point-mass proposals (the tree's nodes are chosen, not drawn): at a node
with target distribution p, child x is accepted with probability p(x); on rejection p loses x
(renormalized) and the next child is tried; when every child is rejected, one token is drawn from
what is left. Each emitted token is then distributed exactly as the target's sampler draws it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_CHILDREN = 4096  # children considered per expanded node (the draft's top tokens): as many as
# a tree may hold (gdsllm.engine.sampling.MAX_DRAFT_TREE), so that a draft that is unsure gets a
# wide first level (an early exit of SmolLM2 at 8 layers has the target's token in its top 64 46%
# of the time, in its top 1024 65%, in its top 4096 78%: docs/BENCHMARKS.md)
DEEP_CHILDREN = 1024  # children considered per expanded node below the root (calibrated trees)


@dataclass
class TreeSpec:
    """A sequence's token tree in a pass: cache indices [start, start + len(parents)) hold its
    nodes; parents[i] is node i's parent node (-1: the token at start - 1, the root), < i."""

    start: int
    parents: list[int]

    def check(self, sid: int, end: int) -> None:
        """ValueError unless the tree covers exactly cache indices [start, end)."""
        if not 0 <= self.start <= end or len(self.parents) != end - self.start:
            raise ValueError(f"sequence {sid}: a tree of {len(self.parents)} nodes from index "
                             f"{self.start} does not end at {end}")
        bad = [i for i, p in enumerate(self.parents) if not -1 <= p < i]
        if bad:
            raise ValueError(f"sequence {sid}: tree nodes {bad[:5]} have a parent that is not "
                             f"an earlier node")


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (a child of the root: 0)."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def tree_positions(spec: TreeSpec, end: int) -> list[int]:
    """The rotary position of cache indices [0, end): the index before the tree, start + depth in it."""
    return list(range(spec.start)) + [spec.start + d for d in depths(spec.parents)][: end - spec.start]


def tree_visibility(spec: TreeSpec, first: int, end: int) -> torch.Tensor:
    """bool [end - first, end]: which keys (cache indices [0, end)) each of the rows at cache
    indices [first, end) sees: causal before the tree; a tree node sees the prefix, its
    ancestors and itself."""
    n = len(spec.parents)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(spec.parents):
        if p >= 0:
            anc[i] = anc[p]
        anc[i, i] = True
    rows = torch.arange(first, end)[:, None]
    mask = torch.arange(end)[None, :] <= rows
    tree_rows = max(first, spec.start)
    if tree_rows < end:
        mask[tree_rows - first:, spec.start:] = anc[tree_rows - spec.start:]
    return mask


def _children(parents: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        out.setdefault(p, []).append(i)
    return out


def accept_tree_greedy(rows: torch.Tensor, tokens: list[int], parents: list[int]
                       ) -> tuple[list[int], list[int]]:
    """rows [n+1, vocab]: row 0 scores the root's successor, row i+1 node i's. (The accepted
    path's nodes, the tokens emitted: the path's then the target's own.)"""
    best = rows.argmax(-1).tolist()
    kids = _children(parents)
    node, path = -1, []
    while True:
        want = best[node + 1]
        nxt = next((c for c in kids.get(node, ()) if tokens[c] == want), None)
        if nxt is None:
            return path, [tokens[i] for i in path] + [want]
        path.append(nxt)
        node = nxt


def accept_tree_sampled(rows: torch.Tensor, tokens: list[int], parents: list[int], sampler
                        ) -> tuple[list[int], list[int]]:
    """As accept_tree_greedy for a sampled request (module docstring: multi-step speculative
    sampling with point-mass proposals); every draw from the request's generator. After the
    children x_1 .. x_j-1 were rejected the target's distribution is p without them,
    renormalized, so child x_j is accepted with probability p(x_j) / (1 - p(x_1) - ... -
    p(x_j-1)): one copy of the children's p and of their uniforms to the host per node."""
    probs = sampler.probs(rows)
    kids = _children(parents)
    node, path = -1, []
    while True:
        p, nxt = probs[node + 1], None
        children = kids.get(node, [])
        xs = [tokens[c] for c in children]
        px = p[torch.tensor(xs, device=p.device)].tolist() if xs else []
        left = float(p.sum())
        rejected = 0
        us = (torch.rand(len(xs), generator=sampler.rng(p.device), device=p.device).tolist()
              if xs else [])  # one uniform per child, drawn together (independent all the same)
        for c, pxc, u in zip(children, px, us):
            if u < pxc / left:  # u < p(x) / q(x), q = 1 at x
                nxt = c
                break
            if left - pxc <= 0:  # rounding: x held all the mass yet was rejected; p draws x
                break
            left -= pxc
            rejected += 1
        if nxt is None:
            rest = p
            if rejected:  # normalize(max(0, p - q)) after each rejection: p without them
                rest = p.clone()
                rest[torch.tensor(xs[:rejected], device=p.device)] = 0.0
                rest = rest / rest.sum()
            return path, [tokens[i] for i in path] + [sampler.draw(rest)]
        path.append(nxt)
        node = nxt


def branch_probs(row: torch.Tensor, sampler) -> torch.Tensor:
    """The draft's distribution used to rank a node's children: the request's own (temperature,
    top-k, top-p) for sampled requests, the softmax of the logits for greedy ones."""
    if sampler.params.greedy:
        return torch.softmax(row.float(), -1)
    return sampler.probs(row)


def rank_bucket(rank: int) -> int:
    """The statistics bucket of a child's rank among its parent's draft tokens (1: the draft's
    top token): ranks 1-4 each their own, then 5-8, 9-16, 17-32, ... (a wider rank is rarer)."""
    return rank if rank <= 4 else 2 + (rank - 1).bit_length()


def prob_bucket(q: float) -> int:
    """The statistics bucket of a child's draft probability: q >= 1/2, 1/4, ..., below 1/128."""
    return 7 if q < 1 / 128 else min(7, max(0, int(-math.log2(max(q, 1e-30)))))


def rank_buckets(k: int, device) -> torch.Tensor:
    """rank_bucket of ranks 1..k, as a long tensor on `device`."""
    r = torch.arange(1, k + 1, device=device)
    return torch.where(r <= 4, r, 2 + torch.floor(torch.log2((r - 1).double())).long() + 1)


def prob_buckets(q: torch.Tensor) -> torch.Tensor:
    """prob_bucket of every entry of q, as a long tensor."""
    return torch.where(q < 1 / 128, 7, torch.floor(-torch.log2(q.clamp_min(1e-30))).clamp(0, 7)).long()


class Calibration:
    """How often the target accepts a child of an accepted node, by the child's rank among its
    parent's draft tokens and its draft probability (Sequoia's acceptance vector, measured as
    the trees are verified, split by the draft's confidence).

    A draft's probabilities can be far from the target's: an early exit (self:N) of a model not
    trained for it ranks one token first with confidence and is rarely right there, while its
    2nd-64th tokens hold the target's choice as often as not. Best-first on such probabilities
    spends the budget deep under wrong top tokens. The tree scores each child by
    `estimate(rank, q)` instead: the measured rate of its (rank, probability) bucket, shrunk
    towards its rank's rate (`WEIGHT` pseudo-trials), which is shrunk towards a prior worth
    `PRIOR` acceptances (PRIOR / prior pseudo-trials: a rare rank needs as many trials to be
    judged as a common one needs acceptances): the draft's own q (before any verification, SpecExec's order), or the rate
    measured for the ranks just before its own where that is higher. Without that floor a rank
    bucket the tree never held kept the draft's q, tiny past the first few dozen ranks, never
    entered a tree and was never measured: measured on SmolLM2's self:8, trees of 1024 nodes
    stayed 32 wide at the root although ranks 33-1024 hold the target's token a fifth of the
    time. One per Speculator, from the trees of greedy and unseeded requests.

        cal = Calibration()
        cal.estimate(rank=1, q=0.9)                     # 0.9 until observed
        cal.observe_top(q_top, target_rank)            # at an accepted node: the draft's top
                                                        # probabilities, the target's token's rank
        cal.observe(parents, ranks, qs, path)           # or: a verified tree, its accepted path
    """

    PRIOR = 2.0  # acceptances the prior of a rank's rate is worth
    MIN_PRIOR = 1e-4  # (at most PRIOR / MIN_PRIOR pseudo-trials)
    WEIGHT = 4.0  # pseudo-trials of the rank's rate in a (rank, probability) bucket's

    def __init__(self):
        self.trials: dict[tuple, float] = {}  # keys: (rank bucket,), (rank bucket, prob bucket)
        self.accepted: dict[tuple, float] = {}

    def _rate(self, key: tuple, prior: float, weight: float) -> float:
        return (self.accepted.get(key, 0.0) + weight * prior) / (self.trials.get(key, 0.0) + weight)

    def floor(self, b: int) -> float:
        """The prior floor of rank bucket b: the rate measured for bucket b - 1 (0 before)."""
        n = self.trials.get((b - 1,), 0.0)
        return self.accepted.get((b - 1,), 0.0) / n if n > 0 else 0.0

    def estimate(self, rank: int, q: float) -> float:
        b = rank_bucket(rank)
        prior = max(q, self.floor(b))
        return self._rate((b, prob_bucket(q)), self._rank_rate(b, prior), self.WEIGHT)

    def _rank_rate(self, b: int, prior: float) -> float:
        return self._rate((b,), prior, self.PRIOR / max(prior, self.MIN_PRIOR))

    def estimates(self, q: torch.Tensor) -> torch.Tensor:
        """`estimate` of every entry of q [rows, k] (column j: rank j + 1), at once."""
        k = q.shape[-1]
        buckets = rank_bucket(k) + 1
        a1, n1 = torch.zeros(buckets), torch.zeros(buckets)
        a2, n2 = torch.zeros(buckets, 8), torch.zeros(buckets, 8)
        for key, n in self.trials.items():
            if key[0] < buckets:
                (n1 if len(key) == 1 else n2)[key] = n
                (a1 if len(key) == 1 else a2)[key] = self.accepted.get(key, 0.0)
        floor = torch.tensor([self.floor(i) for i in range(buckets)])
        a1, n1, a2, n2, floor = (t.to(q.device) for t in (a1, n1, a2, n2, floor))
        b = rank_buckets(k, q.device)
        qb = prob_buckets(q)
        b2 = b.expand_as(qb)
        prior = torch.maximum(q, floor[b])
        rank_rate = (a1[b] + self.PRIOR * prior / prior.clamp_min(self.MIN_PRIOR)) / (
            n1[b] + self.PRIOR / prior.clamp_min(self.MIN_PRIOR))
        return (a2[b2, qb] + self.WEIGHT * rank_rate) / (n2[b2, qb] + self.WEIGHT)

    def best_rate(self) -> float:
        """The highest estimate any child can get (a bound for expanding: children never score
        above their parent times this). A child of rank r has q <= 1 / r: a bucket of ranks from
        r on reaches neither a higher q nor a higher probability bucket."""
        best = 0.0
        for b in range(1, rank_bucket(MAX_CHILDREN) + 1):
            first = b if b <= 4 else 1 << (b - 3)  # the bucket's best rank
            top = self._rank_rate(b, max(1.0 / first, self.floor(b)))
            qmin = prob_bucket(1.0 / first)
            best = max(best, *(self._rate((b, qb), top, self.WEIGHT) for qb in range(qmin, 8)))
        return max(1e-12, min(1.0, best))

    def observe(self, parents: list[int], ranks: list[int], qs: list[float], path: list[int]) -> None:
        """Every child of the root and of each accepted node was a trial; the path's a success."""
        on_path = set(path)
        accepted_parents = {-1} | on_path
        for i, p in enumerate(parents):
            if p in accepted_parents:
                b = rank_bucket(ranks[i])
                for key in ((b,), (b, prob_bucket(qs[i]))):
                    self.trials[key] = self.trials.get(key, 0.0) + 1.0
                    if i in on_path:
                        self.accepted[key] = self.accepted.get(key, 0.0) + 1.0


    def observe_top(self, q: torch.Tensor, target_rank: int | None) -> None:
        """An accepted node (or the root) whose draft distribution had top probabilities q [k]
        (descending): each of its k likeliest children was a trial, whether or not the tree held
        it; the one the target emitted after the node (its rank, None if beyond k) a success
        (for a sampled request, child x is accepted with probability p(x), so the same).
        Measured this way every rank is judged each pass, not only the ranks trees hold."""
        q = q.cpu()
        k = q.numel()
        b = rank_buckets(k, q.device)
        qb = prob_buckets(q)
        n1 = torch.bincount(b)
        n2 = torch.bincount(b * 8 + qb)
        for key, n in [((int(i),), int(x)) for i, x in enumerate(n1.tolist()) if x] + \
                [((int(i) // 8, int(i) % 8), int(x)) for i, x in enumerate(n2.tolist()) if x]:
            self.trials[key] = self.trials.get(key, 0.0) + n
        if target_rank is not None and 1 <= target_rank <= k:
            rb = rank_bucket(target_rank)
            for key in ((rb,), (rb, int(qb[target_rank - 1]))):
                self.accepted[key] = self.accepted.get(key, 0.0) + 1.0


class TreeBuilder:
    """One sequence's best-first tree (module docstring) while the draft expands it.

    b = TreeBuilder(size=64)
    b.add_children([-1], probs_of_root[None])     # candidates under the root
    nodes = b.to_expand(limit)                     # ...the draft runs these nodes, then
    for n in nodes: b.expanded(n)
    b.add_children(nodes, probs_of_those_nodes)
    tokens, parents, order = b.tree()              # the `size` likeliest nodes, parents first

    With a `calibration` (Calibration), a node's score is the product of its path's calibrated
    acceptance estimates instead of the draft's probabilities; either way a child never scores
    above its parent, so the best `size` nodes are closed under parents.
    """

    def __init__(self, size: int, calibration: Calibration | None = None):
        self.size = size
        self.calibration = calibration
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.logp: list[float] = []
        self.fed: list[int] = []  # nodes the draft has run, in its cache order
        self.tops: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # expanded node (-1: the
        # root) -> the draft's top probabilities and tokens after it (host tensors [k])

    def add_children(self, nodes: list[int], probs: torch.Tensor) -> None:
        """The likeliest children of each of `nodes` (-1: the root) from the draft's
        distributions probs [len(nodes), vocab]: one top-k, the scores computed together, and
        only the children that could still be among the `size` best nodes kept (a node's
        score only falls behind as more nodes come), one copy of those to the host."""
        # uncalibrated, a child past rank `size` never outscores the `size` before it; calibrated
        # it may (the estimates need not fall with the rank): MAX_CHILDREN at the root, fewer below
        # it, where a child scores its parent's score times its own (< 0.1 for a weak draft)
        wide = MAX_CHILDREN if nodes == [-1] else DEEP_CHILDREN
        k = min(wide if self.calibration is not None else self.size, probs.shape[-1])
        dev = probs.device  # scored where the draft's probabilities are; only the kept go to the host
        top = torch.topk(probs.float(), k, dim=-1)
        q = top.values
        est = q if self.calibration is None else self.calibration.estimates(q)
        if self.calibration is not None:
            for i, n in enumerate(nodes):
                self.tops[n] = (q[i], top.indices[i])
        base = torch.tensor([0.0 if n < 0 else self.logp[n] for n in nodes], device=dev)
        score = base[:, None] + torch.log(est.clamp(max=1.0))
        score[(q <= 0) | (est <= 0)] = -math.inf
        flat = score.reshape(-1)
        # the size-th best of the nodes so far and these children: nothing below it ever enters
        pool = torch.cat([torch.tensor(self.logp, device=dev), flat]) if self.logp else flat
        if pool.numel() > self.size:
            cut = torch.topk(pool, self.size).values[-1]
            keep = torch.nonzero((flat >= cut) & (flat > -math.inf)).reshape(-1)
        else:
            keep = torch.nonzero(flat > -math.inf).reshape(-1)
        rows = (keep // k).tolist()  # ascending: node, then rank
        toks = top.indices.reshape(-1)[keep].tolist()
        for r, tok, lp in zip(rows, toks, flat[keep].tolist()):
            self.tokens.append(int(tok))
            self.parents.append(nodes[r])
            self.logp.append(lp)

    def _best(self) -> list[int]:
        """The `size` likeliest nodes, best first (ties: the older node first)."""
        if not self.logp:
            return []
        order = torch.sort(-torch.tensor(self.logp, dtype=torch.float64), stable=True).indices
        return order[: self.size].tolist()

    def to_expand(self, limit: int) -> list[int]:
        """Up to `limit` nodes to run through the draft next: unexpanded nodes of the best
        `size` whose children could still be among them (not the last of the ranking; with a
        calibration, not when even a child at the best measured rate would score below the
        `size`-th node)."""
        fed = set(self.fed)
        best = self._best()
        cut = -math.inf
        if self.calibration is not None and len(best) == self.size:
            cut = self.logp[best[-1]] - math.log(self.calibration.best_rate())
        return [i for i in best[: self.size - 1] if i not in fed and self.logp[i] > cut][:limit]

    def expanded(self, node: int) -> None:
        self.fed.append(node)

    def tree(self) -> tuple[list[int], list[int], list[int]]:
        """(tokens, parents, ids): the tree's nodes in creation order (parents first), `ids`
        their builder ids (for the draft's cache bookkeeping)."""
        ids = sorted(self._best())
        where = {b: i for i, b in enumerate(ids)}
        return ([self.tokens[b] for b in ids], [where[self.parents[b]] if self.parents[b] >= 0 else -1
                                                 for b in ids], ids)
