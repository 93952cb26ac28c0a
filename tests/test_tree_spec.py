"""Token-tree speculation (gdsllm.engine.tree) and the self:N draft (gdsllm.engine.draft.SelfDraft):
each tree node's logits equal those of its own root-to-node path, the accepted path's KV compacts
into the positions a plain decode would give; greedy output with every draft kind and tree sizes
1, 8 and 64 equals the output without a draft (dense and MoE, LLM and serve); sampled acceptance
keeps the target's distribution (chi-square); self:N refuses clearly when its units stream.
"""
from __future__ import annotations

import pytest
import torch

from gdsllm import LLM, SamplingParams
from gdsllm.convert.synth import synth
from gdsllm.engine.adaptive_k import TREE_MAX, TREE_MIN, tree_size
from gdsllm.engine.draft import NgramDraft, load_resident, self_layers
from gdsllm.engine.runner import Runner
from gdsllm.engine.sampling import Sampler
from gdsllm.engine.speculative import load_draft_meta
from gdsllm.engine.tree import (Calibration, TreeBuilder, TreeSpec, accept_tree_greedy, accept_tree_sampled,
                               rank_bucket)
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.client import Client, ServiceError
from service_helpers import Service
from spec_helpers import PROMPTS, chi_square_p, greedy, models, one_thread, reference  # noqa: F401

PREFIX = [5, 9, 200, 31, 7]
ROOT = 44
TOKENS = [3, 17, 3, 250, 8, 99, 17]  # a tree: the same token on two branches on purpose
PARENTS = [-1, -1, 0, 0, 2, 1, 4]


def _path(i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = PARENTS[i]
    return out[::-1]


class _Dense:
    """A tiny dense model's Runner over its resident weights, one pass per call."""

    def __init__(self, model_dir):
        self.meta = load_model_meta(model_dir)
        self.w = load_resident(self.meta, torch.device("cpu"))
        self.runner = Runner(self.meta.params, "cpu", torch.float32, architecture=self.meta.architecture)

    def run(self, chunks, all_logits=False, **kw):
        self.runner.start_pass(chunks, all_logits, **kw)
        for u in self.meta.units:
            self.runner.run_unit(u, self.w[u.name])
        return self.runner.end_pass()


def test_each_tree_node_sees_its_own_path_and_compacts_into_place(models):
    m = _Dense(models[0])
    want = []
    for i in range(len(TOKENS)):  # reference: each node's root-to-node path as a plain sequence
        want.append(m.run([(100 + i, PREFIX + [ROOT] + [TOKENS[j] for j in _path(i)])], True)[-1])
        m.runner.release(100 + i)
    m.run([(1, PREFIX)])
    start = len(PREFIX) + 1
    # the first four nodes in one pass, the other three in a second (as a draft expands a tree)
    got = m.run([(1, [ROOT] + TOKENS[:4])], True, trees={1: TreeSpec(start, PARENTS[:4])})[1:]
    got = torch.cat([got, m.run([(1, TOKENS[4:])], True, trees={1: TreeSpec(start, PARENTS)})])
    for i in range(len(TOKENS)):
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-4)
    keep = _path(6)  # nodes 1, 5, 6: their KV moves to start, start + 1, start + 2
    m.runner.compact(1, start, [start + i for i in keep])
    assert m.runner.seq_len(1) == start + len(keep)
    nxt = m.run([(1, [11])])[0]
    ref = m.run([(2, PREFIX + [ROOT] + [TOKENS[i] for i in keep] + [11])])[0]
    torch.testing.assert_close(nxt, ref, rtol=1e-4, atol=1e-4)


def test_a_tree_that_does_not_cover_the_cache_is_refused(models):
    m = _Dense(models[0])
    m.run([(1, PREFIX)])
    with pytest.raises(ValueError, match="tree of 1 nodes from index 6 does not end at 8"):
        m.runner.start_pass([(1, [ROOT, 3, 4])], trees={1: TreeSpec(len(PREFIX) + 1, [-1])})
    with pytest.raises(ValueError, match="parent"):
        m.runner.start_pass([(1, [ROOT, 3, 4])], trees={1: TreeSpec(len(PREFIX) + 1, [-1, 1])})


def test_greedy_tree_acceptance_walks_the_targets_argmax():
    rows = torch.full((len(TOKENS) + 1, 300), -5.0)
    rows[0, 3] = rows[1, 250] = rows[4, 1] = 5.0  # root -> 3 (node 0) -> 250 (node 3) -> 1
    assert accept_tree_greedy(rows, TOKENS, PARENTS) == ([0, 3], [3, 250, 1])
    rows[0, 3], rows[0, 2] = -5.0, 5.0  # no child carries the argmax: the target's own token
    assert accept_tree_greedy(rows, TOKENS, PARENTS) == ([], [2])


def test_sampled_tree_acceptance_keeps_the_targets_distribution():
    """Root children 2, 4, 0 (nodes 0-2); node 0's children 1, 3. The first token follows p at the
    root and, after 2, the second follows p at node 0 (chi-square), whatever the tree holds."""
    g = torch.Generator().manual_seed(3)
    V, N = 6, 6000
    tokens, parents = [2, 4, 0, 1, 3], [-1, -1, -1, 0, 0]
    rows = torch.randn(len(tokens) + 1, V, generator=g) * 1.2
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=5))
    p = s.probs(rows)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        path, out = accept_tree_sampled(rows, tokens, parents, s)
        assert out[:-1] == [tokens[i] for i in path]
        first[out[0]] += 1
        if out[0] == 2:
            assert path[0] == 0 and len(out) >= 2
            second[out[1]] += 1
    assert chi_square_p(first, p[0]) > 1e-3
    assert chi_square_p(second, p[1]) > 1e-3


def test_best_first_tree_is_closed_under_parents_and_sized():
    b = TreeBuilder(size=4)
    b.add_children([-1], torch.tensor([[0.5, 0.3, 0.2, 0.0]]))  # no child of probability 0
    assert b.to_expand(8) == [0, 1, 2]
    b.expanded(0)
    b.add_children([0], torch.tensor([[0.1, 0.9, 0.0, 0.0]]))  # 0 -> 1 (0.45), 0 -> 0 (0.05)
    assert b.to_expand(8) == [3, 1]  # node 2 now ranks last of the four: its children never enter
    tokens, parents, ids = b.tree()
    assert tokens == [0, 1, 2, 1] and parents == [-1, -1, -1, 0] and ids == [0, 1, 2, 3]
    assert tree_size(None) >= TREE_MIN and tree_size(1e-6) == TREE_MAX and tree_size(0.5) == TREE_MIN


def _fake_draft(path: tuple, vocab: int) -> torch.Tensor:
    """A draft distribution that depends only on the path (no ties)."""
    g = torch.Generator().manual_seed(hash(path) % (1 << 31))
    return torch.softmax(torch.randn(vocab, generator=g) * 2.0, -1)


def _grow(size: int, depth: int, vocab: int, cal=None) -> TreeBuilder:
    """A TreeBuilder expanded as DraftModel.propose_tree does: one level per draft pass."""
    b = TreeBuilder(size, cal)
    paths = {-1: ()}
    b.add_children([-1], _fake_draft((), vocab)[None])
    for _ in range(depth - 1):
        nodes = b.to_expand(10 ** 6)
        for n in nodes:
            b.expanded(n)
            paths[n] = paths[b.parents[n]] + (b.tokens[n],)
        if nodes:
            b.add_children(nodes, torch.stack([_fake_draft(paths[n], vocab) for n in nodes]))
    return b


@pytest.mark.parametrize("calibrated", [False, True])
def test_best_first_tree_holds_the_likeliest_paths(calibrated):
    """The tree's nodes are exactly the `size` best root-to-node paths of at most `depth` tokens
    by cumulative score (the draft's probabilities, or the calibrated estimates), found by
    enumerating every path."""
    vocab, size, depth = 5, 12, 4
    cal = None
    if calibrated:
        cal = Calibration()
        cal.observe([-1, -1, -1, 0, 1], [1, 2, 3, 1, 1], [0.6, 0.2, 0.1, 0.9, 0.3], [1, 4])
        cal.observe([-1, -1], [1, 2], [0.9, 0.05], [])  # nothing accepted
    scores = {}

    def walk(path, score):
        if len(path) == depth:
            return
        q = _fake_draft(path, vocab)
        order = torch.argsort(q, descending=True).tolist()
        for rank, tok in enumerate(order, 1):
            est = float(q[tok]) if cal is None else cal.estimate(rank, float(q[tok]))
            scores[path + (tok,)] = score + torch.log(torch.tensor(est)).item()
            walk(path + (tok,), scores[path + (tok,)])
    walk((), 0.0)
    want = set(sorted(scores, key=scores.get, reverse=True)[:size])
    tokens, parents, _ = _grow(size, depth, vocab, cal).tree()
    got = []
    for t, p in zip(tokens, parents):
        got.append((got[p] if p >= 0 else ()) + (t,))
    assert set(got) == want and len(got) == size


def test_calibrated_tree_follows_the_ranks_the_target_accepts():
    """An early exit that ranks one token first with confidence and is never right there, its
    second token usually is: by the draft's probabilities the tree follows the top tokens (0, then
    0 under it); calibrated by the acceptance measured per rank it follows the second-ranked
    children (1, then 1 under it); beside them the third-ranked root child (2), not the top one:
    both were rejected ten times in ten, but the third rank's rate is shrunk towards the second
    rank's (Calibration.floor), the first's towards its q."""
    cal = Calibration()
    assert cal.estimate(1, 0.9) == pytest.approx(0.9)  # nothing observed: the draft's own q
    for _ in range(10):  # rank 1 always rejected, the rank-2 child accepted
        cal.observe([-1, -1, -1, 0], [1, 2, 3, 1], [0.9, 0.04, 0.03, 0.9], [1])
    assert cal.trials[(rank_bucket(1),)] == 10 and cal.accepted.get((rank_bucket(1),), 0) == 0
    assert cal.estimate(1, 0.9) < cal.estimate(3, 0.03) < 0.2 < cal.estimate(2, 0.05)
    root = torch.tensor([[0.9, 0.04, 0.03, 0.02, 0.01]])
    for c, want in ((None, ([0, 0, 1], [-1, 0, 0])), (cal, ([1, 2, 1], [-1, -1, 0]))):
        b = TreeBuilder(3, c)
        b.add_children([-1], root)
        nodes = b.to_expand(8)
        for n in nodes:
            b.expanded(n)
        b.add_children(nodes, torch.tensor([[0.9, 0.05, 0.03, 0.01, 0.01]] * len(nodes)))
        assert b.tree()[:2] == want


def test_calibration_judges_every_rank_of_an_accepted_node():
    """observe_top: each of an accepted node's top-k children is a trial whether the tree held it
    or not, the target's token a success; the builder keeps the top-k of each node it expands, so
    ranks no tree held are measured too (and a rank no tree held can rise into the tree)."""
    cal = Calibration()
    q = torch.cat([torch.tensor([0.5, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]),
                   torch.linspace(1.5e-3, 1e-4, 56)])  # descending, no ties
    for _ in range(20):
        cal.observe_top(q, 40)  # the target's token is always the draft's 40th
    cal.observe_top(q, None)  # beyond the draft's top 64: a trial for every rank, no success
    b40 = rank_bucket(40)
    assert cal.trials[(1,)] == 21 and cal.accepted.get((1,), 0) == 0
    assert cal.trials[(b40,)] == 21 * 32 and cal.accepted[(b40,)] == 20
    assert cal.estimate(40, float(q[39])) > cal.estimate(1, 0.5)
    b = TreeBuilder(4, cal)
    b.add_children([-1], q[None])
    tokens = b.tree()[0]
    assert set(range(32, 64)) & set(tokens) and set(b.tops) == {-1}
    assert torch.equal(b.tops[-1][0], q) and b.tops[-1][1].tolist() == list(range(64))


def test_ngram_tree_is_a_trie_of_every_continuation():
    d = NgramDraft(300)
    s = Sampler(SamplingParams(temperature=0))
    prop = d.propose_tree([(0, [1, 2, 8, 1, 2, 9, 4, 1, 2], 3, s)], {0: 8})[0]
    assert prop.tokens == [9, 4, 1, 8, 1, 2] and prop.parents == [-1, 0, 1, -1, 3, 4]


def test_self_draft_parsing_and_no_bytes(models):
    meta = load_model_meta(models[0])
    assert self_layers("self:2") == 2 and self_layers("ngram") is None and self_layers(None) is None
    assert load_draft_meta(meta, "self:3") is None
    for bad in ("self:4", "self:0", "self:x"):
        with pytest.raises(ValueError, match="self:"):
            load_draft_meta(meta, bad)


def test_self_draft_refuses_streamed_units(models):
    target = models[0]
    meta = load_model_meta(target)
    head_embed = sum(u.nbytes for u in meta.units if u.kind in ("embed", "head"))
    block = max(u.nbytes for u in meta.units if u.kind == "block")
    budget = head_embed + 3 * block + 8 * 4096  # block.0 resident, two streaming slots
    with pytest.raises(ValueError, match="--draft self:2: units block.1 are not resident"):
        LLM(str(target), draft="self:2", vram_budget=budget)
    with LLM(str(target), draft="self:1", vram_budget=budget, draft_tree=8) as llm:  # block.0 is
        assert llm.generate(PROMPTS[0], greedy(8)).token_ids == llm.generate(
            PROMPTS[0], greedy(8, draft_tokens=0)).token_ids


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree_moe")
    target = synth(root / "target", "tiny-moe", layers=3, dtype="float32", seed=5)
    with LLM(str(target)) as llm:
        return target, [o.token_ids for o in llm.generate(PROMPTS, greedy(16))]


@pytest.mark.parametrize("kind", ["model", "ngram", "self:2"])
def test_llm_greedy_with_trees_equals_without(kind, models, reference, moe):
    target, draft = models
    for size in (1, 8, 64):
        with LLM(str(target), draft=str(draft) if kind == "model" else kind, draft_tree=size) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, greedy(24))] == reference, size
            st = llm.speculator.stats
            assert st.tree_passes > 0 or kind == "ngram"
            assert st.tree_nodes <= size * st.tree_passes
        with LLM(str(moe[0]), draft=str(draft) if kind == "model" else kind, draft_tree=size) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, greedy(16))] == moe[1], ("moe", size)


def test_llm_per_request_tree_and_seeded_sampling(models, reference):
    target, _ = models
    with LLM(str(target), draft="self:2", draft_tree="auto") as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy(24, draft_tree=0))] == reference
        assert llm.speculator.stats.tree_passes == 0  # draft_tree=0: chains
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy(24))] == reference
        assert llm.speculator.stats.tree_passes > 0
        seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True, draft_tree=16)
        a = llm.generate(PROMPTS[1], seeded).token_ids
        assert len(a) == 12 and a == llm.generate(PROMPTS[1], seeded).token_ids


@pytest.mark.parametrize("kind", ["model", "ngram", "self:2"])
def test_service_greedy_with_trees_equals_llm(kind, models, reference, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    target, draft = models
    d = draft if kind == "model" else kind
    with Service(target, draft=d, draft_tokens=3, draft_tree=8) as s, \
            Client(s.endpoint, timeout=60) as c:
        texts = [p for p in PROMPTS if isinstance(p, str)]
        got = [c.generate(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids for p in texts]
        assert got == reference[:len(got)]
        one = c.generate(texts[0], max_tokens=24, temperature=0, ignore_eos=True, draft_tree=64)
        assert one.token_ids == reference[0]
        with pytest.raises(ServiceError, match="draft_tree must be 0 to 4096"):
            c.generate(texts[0], max_tokens=4, draft_tree=5000)
        m = s.svc.coordinator.metrics
        assert m.draft_tokens._value.get() > 0
        sizes = m.draft_size.collect()[0].samples  # tree nodes per pass, at most 64 (draft_tree)
        assert {x.labels["le"]: x.value for x in sizes if x.name.endswith("_bucket")}["64.0"] == \
            next(x.value for x in sizes if x.name.endswith("_count")) > 0
        drafting = m.draft_seconds.collect()[0].samples
        assert next(x.value for x in drafting if x.name.endswith("_count")) > 0


def test_trees_fit_the_free_kv_cache_and_give_their_blocks_back(models, reference):
    """A KV cache barely larger than the batch needs: each sequence is admitted with room for its
    64-node trees (the scheduler's books own every block: a tree borrows none), the others wait,
    and every block is back in the books at the end."""
    target, _ = models
    with LLM(str(target), draft="self:2", draft_tree=64, kv_tokens=240) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy(24))] == reference
        assert llm.speculator.stats.tree_passes > 0
        assert llm.scheduler.books.used_blocks == 0 and llm.runner.cache.free_blocks == 0


def test_service_moe_greedy_with_a_tree_equals_llm(models, moe, monkeypatch):
    """A mixture of experts served with a model draft's 8-node trees: the LLM's greedy tokens.
    (self:N there needs the experts resident in the compute worker: refused otherwise.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    target, want = moe
    with Service(target, draft=models[1], draft_tokens=3, draft_tree=8) as s, \
            Client(s.endpoint, timeout=60) as c:
        texts = [p for p in PROMPTS if isinstance(p, str)]
        got = [c.generate(p, max_tokens=16, temperature=0, ignore_eos=True).token_ids for p in texts]
        assert got == want[:len(got)]
        assert s.svc.coordinator.metrics.draft_tokens._value.get() > 0


def test_service_refuses_self_draft_without_resident_experts(moe):
    from gdsllm.service.worker_set import WorkerStartError
    with pytest.raises(WorkerStartError, match="cannot start its draft: --draft self:2: the experts"):
        with Service(moe[0], draft="self:2", draft_tree=8):
            pass


@pytest.mark.parametrize("window", [None, 3])
def test_tree_attention_equals_each_nodes_own_path(window):
    """At the attention level, sliding window included: a node's row equals plain attention over
    the prefix and its own ancestors (positions prefix + depth)."""
    from gdsllm.engine.tree import tree_positions, tree_visibility
    from gdsllm.models.attention import attention, tree_attention
    g = torch.Generator().manual_seed(0)
    prefix, parents = 5, [-1, -1, 0, 1, 2, 4]
    spec = TreeSpec(prefix, parents)
    L, n = prefix + len(parents), len(parents)
    q = torch.randn(4, n, 8, generator=g)
    k, v = torch.randn(2, L, 8, generator=g), torch.randn(2, L, 8, generator=g)
    mask = tree_visibility(spec, prefix, L)
    got = tree_attention(q, k, v, mask, torch.tensor(tree_positions(spec, L)), window=window)
    for i in range(n):
        path, j = [], i
        while j >= 0:
            path.append(prefix + j)
            j = parents[j]
        keys = list(range(prefix)) + path[::-1]
        want = attention(q[:, i: i + 1], k[:, keys], v[:, keys], len(keys) - 1, window=window)
        torch.testing.assert_close(got[i: i + 1], want, rtol=1e-5, atol=1e-5)
