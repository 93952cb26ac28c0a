"""Adaptive draft length: K per sequence from its recent acceptance and the measured cost of a
draft pass against a target pass (speculative decoding, gdsllm.engine.speculative).

    ak = AdaptiveK()
    k = ak.k(seq_id, cap=4)              # 1 .. cap; cap until anything was measured
    ak.observe(seq_id, drafted=k, accepted=j)
    ak.timing(draft_s=0.004, draft_passes=4, target_s=0.9)   # one speculative step's wall times
    ak.release(seq_id)

Model: each draft token is accepted with probability `a` (independently, the usual chain
assumption), so a step with k drafts yields E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)
tokens and costs T + k * D (T: one target pass, D: one draft pass). K is the k in [1, cap] that
maximises E(k) / (T + k * D). `a` is an exponential average of the sequence's accept /
reject events (decay DECAY per step, a weak prior of PRIOR); D / T an exponential average over
steps of the whole speculator (the passes are batched, so the ratio is shared). When target
passes stream (T large, D small) the best k stays at the cap unless acceptance collapses; when the
target is resident and the draft not much cheaper (a CPU), k falls to 1 as soon as drafts are
rejected. K grows back as drafts get accepted again.

Token trees (gdsllm.engine.tree) take their size T from how a target pass's time grows with the
tokens it scores (`tree_size`). Every timed pass gives (seconds, tokens); `pass_cost` fits
seconds = a + b * tokens to them (an exponentially weighted least-squares line): a is what a pass
costs whatever it scores (the weights it streams or reads), b what each more token costs (compute).
T = TREE_COST_SHARE * a / b: verifying the tree may add a quarter of the pass's fixed cost (a tree's
last nodes add little: each is accepted rarely). A streamed target on a GPU (a in tens of
milliseconds to seconds, b microseconds) gets TREE_MAX nodes; one where compute dominates (b large
against a: a CPU, a big model resident) a few. Until the passes differ
enough in tokens for a fit (the first one carries the prompt), T comes from the draft / target
pass cost ratio, TREE_SCALE / ratio, and before any pass was timed (and for prompt lookup, which
times no draft pass) it is TREE_DEFAULT; always within [TREE_MIN, TREE_MAX].
"""
from __future__ import annotations

DECAY = 0.7  # weight of the past per step: about the last 3 steps count
PRIOR = (0.7, 1.0)  # (acceptance, weight in events) before a sequence has been observed
RATIO_DECAY = 0.8
TREE_MIN, TREE_MAX, TREE_DEFAULT, TREE_SCALE = 4, 2048, 64, 2.0
TREE_COST_SHARE = 0.25  # of a pass's fixed cost that verifying a tree may add
COST_DECAY = 0.95  # weight of the past in the pass-cost fit: about the last 20 passes
MIN_SPREAD = 4.0  # tokens: the weighted standard deviation of the passes' sizes a fit needs


def tree_size(ratio: float | None, cost: tuple[float, float] | None = None) -> int:
    """Token-tree nodes for a pass cost (a, b) = `AdaptiveK.pass_cost()`, else for a draft-pass /
    target-pass cost ratio (module docstring)."""
    if cost is not None:
        a, b = cost
        t = TREE_MAX if b <= 0 else TREE_COST_SHARE * a / b
    elif ratio is None:
        return TREE_DEFAULT
    else:
        t = TREE_MAX if ratio <= 0 else TREE_SCALE / ratio
    return int(min(TREE_MAX, max(TREE_MIN, round(t))))


def expected_tokens(a: float, k: int) -> float:
    """Tokens one target pass yields with k drafts, each accepted with probability a."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def best_k(a: float, ratio: float, cap: int) -> int:
    """argmax over k in [1, cap] of E(k) / (1 + k * ratio); the smallest k on ties."""
    best, score = 1, -1.0
    for k in range(1, cap + 1):
        s = expected_tokens(a, k) / (1.0 + k * ratio)
        if s > score * (1 + 1e-9):
            best, score = k, s
    return best


class AdaptiveK:
    def __init__(self, decay: float = DECAY, prior: tuple[float, float] = PRIOR):
        self.decay, self.prior = decay, prior
        self.events: dict[int, tuple[float, float]] = {}  # seq_id -> (accepted, trials), averaged
        self.ratio: float | None = None  # D / T: one draft pass over one target pass
        self._sums = [0.0] * 5  # weighted sums of 1, n, t, n * n, n * t over timed target passes
        self._cost: tuple[float, float] | None = None  # the last fit (a, b)

    def acceptance(self, seq_id: int) -> float:
        acc, n = self.events.get(seq_id, (self.prior[0] * self.prior[1], self.prior[1]))
        return acc / n if n > 0 else self.prior[0]

    def k(self, seq_id: int, cap: int) -> int:
        """Drafts for this sequence's next step: 0 if cap is 0, else 1 .. cap."""
        if cap <= 0:
            return 0
        if self.ratio is None:
            return cap
        return best_k(self.acceptance(seq_id), self.ratio, cap)

    def observe(self, seq_id: int, drafted: int, accepted: int) -> None:
        """A verification: `accepted` of `drafted` kept (a rejection unless all were)."""
        if drafted <= 0:
            return
        acc, n = self.events.get(seq_id, (self.prior[0] * self.prior[1], self.prior[1]))
        trials = accepted + (1 if accepted < drafted else 0)
        self.events[seq_id] = (self.decay * acc + accepted, self.decay * n + trials)

    def timing(self, draft_s: float, draft_passes: int, target_s: float, target_tokens: int = 0) -> None:
        """One speculative step: `draft_passes` draft passes took draft_s, the target pass
        target_s for `target_tokens` tokens (0: not counted)."""
        if target_s > 0 and target_tokens > 0:
            self._fit(target_tokens, target_s)
        if draft_passes <= 0 or target_s <= 0:
            return
        r = (draft_s / draft_passes) / target_s
        self.ratio = r if self.ratio is None else RATIO_DECAY * self.ratio + (1 - RATIO_DECAY) * r

    def _fit(self, n: float, t: float) -> None:
        w = self._sums
        for i, x in enumerate((1.0, n, t, n * n, n * t)):
            w[i] = COST_DECAY * w[i] + x
        mean_n, mean_t = w[1] / w[0], w[2] / w[0]
        var = w[3] / w[0] - mean_n * mean_n
        if var >= MIN_SPREAD ** 2:
            b = max(0.0, (w[4] / w[0] - mean_n * mean_t) / var)
            self._cost = (max(0.0, mean_t - b * mean_n), b)

    def pass_cost(self) -> tuple[float, float] | None:
        """(a, b): a target pass of n tokens takes about a + b * n seconds (module docstring);
        None until the timed passes differed enough in size. The last fit stays while they do not."""
        return self._cost

    def release(self, seq_id: int) -> None:
        self.events.pop(seq_id, None)
