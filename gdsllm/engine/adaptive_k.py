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

Token trees (gdsllm.engine.tree) take their size T from the same ratio (`tree_size`): a target
pass costs about the same for a few hundred extra tokens when its weights stream, so T grows as
a draft pass gets cheap against it, TREE_SCALE / ratio nodes within [TREE_MIN, TREE_MAX]: a few
when the target is resident and a draft pass costs a good part of its pass, hundreds when a pass
streams gigabytes. Before any draft pass was timed (and for prompt lookup, which runs none) it is
TREE_DEFAULT.
"""
from __future__ import annotations

DECAY = 0.7  # weight of the past per step: about the last 3 steps count
PRIOR = (0.7, 1.0)  # (acceptance, weight in events) before a sequence has been observed
RATIO_DECAY = 0.8
TREE_MIN, TREE_MAX, TREE_DEFAULT, TREE_SCALE = 4, 512, 64, 2.0


def tree_size(ratio: float | None) -> int:
    """Token-tree nodes for a draft-pass / target-pass cost ratio (module docstring)."""
    if ratio is None:
        return TREE_DEFAULT
    if ratio <= 0:
        return TREE_MAX
    return int(min(TREE_MAX, max(TREE_MIN, round(TREE_SCALE / ratio))))


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

    def timing(self, draft_s: float, draft_passes: int, target_s: float) -> None:
        """One speculative step: `draft_passes` draft passes took draft_s, the target pass target_s."""
        if draft_passes <= 0 or target_s <= 0:
            return
        r = (draft_s / draft_passes) / target_s
        self.ratio = r if self.ratio is None else RATIO_DECAY * self.ratio + (1 - RATIO_DECAY) * r

    def release(self, seq_id: int) -> None:
        self.events.pop(seq_id, None)
