"""The engine's scheduler alone (gdsllm.engine.scheduler): pure policy, driven by a fake executor.
No model, no torch work, no processes: admission by KV blocks and max_batch, chunked prefill,
draft lengths, the books a plan carries, stop rules, cancellation and failures."""
from __future__ import annotations

import pytest

from gdsllm.engine.adaptive_k import TREE_MAX
from gdsllm.engine.blocks import BlockBooks
from gdsllm.engine.sampling import SamplingParams
from gdsllm.engine.scheduler import PassResult, Scheduler
from gdsllm.engine.sequence import Generation

EOS = 2


def gen(seq_id: int, prompt_len: int = 3, max_tokens: int = 4, **kw) -> Generation:
    return Generation(list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **kw),
                      {EOS}, 100, None, seq_id)


class FakeExecutor:
    """Answers every chunk that ends its prompt with `token` (plus accepted drafts), and checks
    the books: a sequence's KV holds what it was fed, within the blocks its table gave it."""

    def __init__(self, books: BlockBooks, token=7, accept: int = 0):
        """`token`: the token sampled, or a function of (seq_id, tokens in its KV)."""
        self.books, self.token, self.accept = books, token, accept
        self.tables: dict[int, list[int]] = {}
        self.kv: dict[int, int] = {}
        self.released: list[int] = []
        self.results: dict[int, dict[int, list[int]]] = {}  # pass_id -> its tokens
        self.fed: dict[int, int] = {}  # seq_id -> passes that fed it

    def execute(self, plan) -> PassResult:
        if plan.follows is not None:  # scheduled ahead: its tokens are those of the pass before
            assert max(self.results) == plan.follows and not plan.tokens
            plan = plan.resolve(self.results[plan.follows])
        result = self._execute(plan)
        self.results[plan.pass_id] = result.tokens
        return result

    def _execute(self, plan) -> PassResult:
        for sid in plan.released:
            self.released.append(sid)
            self.tables.pop(sid)
            self.kv.pop(sid)
        for sid, table in plan.tables.items():
            assert sid not in self.tables and table == self.books.tables[sid]
            self.tables[sid], self.kv[sid] = table, 0
        tokens = {}
        for sid, toks in plan.chunks:
            k = plan.draft.get(sid, 0)
            self.fed[sid] = self.fed.get(sid, 0) + 1
            self.kv[sid] += len(toks) + k
            assert self.kv[sid] <= len(self.tables[sid]) * self.books.block_size, (sid, self.kv[sid])
            if sid not in plan.partial:
                acc = min(k, self.accept)
                self.kv[sid] -= k - acc  # rejected drafts are rolled back
                t = self.token(sid, self.kv[sid]) if callable(self.token) else self.token
                tokens[sid] = [t] * acc + [t]
        return PassResult(tokens)


def run(sched: Scheduler, ex: FakeExecutor, limit: int = 100) -> list:
    plans = []
    while sched.has_work and limit:
        plan = sched.schedule()
        assert plan is not None
        plans.append(plan)
        sched.update(ex.execute(plan))
        limit -= 1
    return plans


def test_admission_waits_for_blocks_in_order_and_frees_them():
    books = BlockBooks(num_blocks=1 + 2, block_size=4)  # 8 tokens: one request of 3 + 4 at a time
    sched, ex = Scheduler(books, max_batch=8), FakeExecutor(books)
    a, b = gen(1), gen(2)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert first.seq_ids == [1] and first.tables == {1: [1, 2]} and list(sched.waiting) == [b]
    assert first.new == {1: a.params} and not first.partial
    sched.update(ex.execute(first))
    plans = run(sched, ex)
    assert a.token_ids == [7] * 4 and a.finish_reason == "length"
    assert b.token_ids == [7] * 4 and books.used_blocks == 0
    joined = next(p for p in plans if 2 in p.tables)
    assert joined.released == (1,) and joined.tables[2] == [1, 2]  # a's blocks, given again


def test_never_fits_names_the_sizes():
    sched = Scheduler(BlockBooks(1 + 2, 4), max_batch=4)
    assert sched.never_fits(gen(1, prompt_len=3, max_tokens=5)) is None
    why = sched.never_fits(gen(2, prompt_len=6, max_tokens=5))
    assert "11 tokens" in why and "8 tokens" in why


def test_max_batch_and_chunked_prefill():
    books = BlockBooks(1 + 64, 16)
    sched, ex = Scheduler(books, max_batch=2, max_pass_tokens=5), FakeExecutor(books)
    long, short, third = gen(1, prompt_len=12), gen(2, prompt_len=2), gen(3, prompt_len=1)
    for g in (long, short, third):
        sched.add(g)
    p1 = sched.schedule()
    assert p1.chunks == [(1, long.prompt_ids[:5])] and p1.partial == {1}  # the budget is spent
    sched.update(ex.execute(p1))
    assert long.token_ids == []  # a mid-prompt chunk samples nothing
    p2 = sched.schedule()  # the rest of the long prompt goes first, then the next waiting one
    assert p2.chunks == [(1, long.prompt_ids[5:10]), ] and 2 not in p2.seq_ids
    sched.update(ex.execute(p2))
    p3 = sched.schedule()
    assert p3.chunks == [(1, long.prompt_ids[10:]), (2, short.prompt_ids)] and not p3.partial
    sched.update(ex.execute(p3))
    p4 = sched.schedule()  # decoding ones first, one token each; max_batch keeps 3 waiting
    assert p4.chunks == [(1, [7]), (2, [7])] and list(sched.waiting) == [third]
    sched.update(ex.execute(p4))
    run(sched, ex)
    assert all(g.finish_reason == "length" for g in (long, short, third))


def test_draft_lengths_and_accepted_tokens():
    books = BlockBooks(1 + 8, 4)
    sched, ex = Scheduler(books, max_batch=4, draft_tokens=3), FakeExecutor(books, accept=2)
    g, off = gen(1, max_tokens=6), gen(2, max_tokens=6, draft_tokens=0)
    sched.add(g)
    sched.add(off)
    p = sched.schedule()
    assert p.draft == {1: 3}  # the request that turned drafting off gets none
    steps = sched.update(ex.execute(p))
    assert [s.ids for s in steps] == [[7, 7, 7], [7]]
    p = sched.schedule()
    assert p.draft == {1: 2}  # never past what it may still generate (6 - 3 - its own token)
    sched.update(ex.execute(p))
    run(sched, ex)
    assert len(g.token_ids) == 6 and g.finish_reason == "length"  # the last pass was cut


def test_stop_rules_cut_a_pass_and_eos_ends():
    books = BlockBooks(1 + 8, 4)
    sched, ex = Scheduler(books, max_batch=4, draft_tokens=3), FakeExecutor(books, token=EOS, accept=3)
    g = gen(1, max_tokens=8)
    sched.add(g)
    steps = sched.update(ex.execute(sched.schedule()))
    assert steps[0].ids == [EOS] and steps[0].finished and g.finish_reason == "stop"
    assert not sched.has_work and books.used_blocks == 0 and sched.take_released() == [1]


def test_cancel_in_flight_waits_for_the_result_and_failures():
    books = BlockBooks(1 + 8, 4)
    sched, ex = Scheduler(books, max_batch=4), FakeExecutor(books)
    a, b, c = gen(1), gen(2), gen(3)
    for g in (a, b):
        sched.add(g)
    plan = sched.schedule()
    assert sched.schedule() is None  # one pass in flight at a time
    assert sched.cancel(1) is False and a.cancelled  # in the pass: it leaves at the update
    steps = sched.update(ex.execute(plan))
    assert [(s.gen.seq_id, s.finished, s.ids) for s in steps] == [(1, True, []), (2, False, [7])]
    sched.add(c)
    assert sched.cancel(3) is True and not sched.waiting  # waiting: gone now
    plan = sched.schedule()
    assert plan.released == (1,) and plan.seq_ids == [2]
    assert sched.fail_pass() == [b] and not sched.running and books.used_blocks == 0
    sched.add(gen(4))
    plan = sched.schedule()
    result = ex.execute(plan)
    result.failed[4] = "logits are not finite"
    (step,) = sched.update(result)
    assert step.error == "logits are not finite" and step.finished and not sched.has_work


def test_reset_fails_the_running_and_keeps_the_waiting():
    books = BlockBooks(1 + 2, 4)
    sched = Scheduler(books, max_batch=4)
    a, b = gen(1), gen(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.reset(BlockBooks(1 + 4, 4)) == [a] and list(sched.waiting) == [b]
    plan = sched.schedule()
    assert plan.seq_ids == [2] and plan.released == ()  # the new executor never knew sequence 1


def test_books_refuse_what_is_not_free():
    books = BlockBooks(1 + 2, 4)
    assert books.allocate(1, 5) == [1, 2] and not books.fits(1)
    with pytest.raises(ValueError, match="need 1 KV blocks"):
        books.allocate(2, 1)
    assert books.free(1) and not books.free(1) and books.fits(8)


def test_a_tree_drafting_sequence_keeps_room_for_its_branches():
    books = BlockBooks(1 + 16, 4)
    sched = Scheduler(books, max_batch=4, draft_tokens=4, draft_tree=16)
    plain, tree, chain = gen(1), gen(2, draft_tree=8), gen(3, draft_tokens=0)
    for g in (plain, tree, chain):
        sched.add(g)
    assert [sched.kv_need(g) for g in (plain, tree, chain)] == [3 + 4 + 16, 3 + 4 + 8, 3 + 4]
    plan = sched.schedule()
    assert [len(plan.tables[s]) for s in (1, 2, 3)] == [6, 4, 2]  # blocks of 4 tokens
    assert Scheduler(books, max_batch=1, draft_tokens=4, draft_tree="auto").kv_need(gen(4)) == 3 + 4 + TREE_MAX
    assert "draft tree (16)" in Scheduler(BlockBooks(1 + 2, 4), max_batch=1, draft_tokens=4,
                                          draft_tree=16).never_fits(gen(5))


# ---------------------------------------------------------------- a pass scheduled ahead


def run_ahead(sched: Scheduler, ex: FakeExecutor, limit: int = 200) -> list:
    """The service's loop: a plan when none is in flight, the pass ahead whenever the scheduler
    gives one (right after sending and after each update), the executor taking them in order."""
    plans, sent = [], []
    while sched.has_work and limit:
        if sched.in_flight is None:
            sent.append(sched.schedule())
            assert sent[-1] is not None
        ahead = sched.schedule_ahead()
        if ahead is not None:
            sent.append(ahead)
        plans.append(sent.pop(0))
        sched.update(ex.execute(plans[-1]))
        limit -= 1
    assert not sent and sched.in_flight is None
    return plans


def varied(sid: int, n: int) -> int:
    """A token that depends on the sequence and its length; EOS for sequence 3's 4th token."""
    return EOS if (sid, n) == (3, 3 + 4) else 20 + (sid * 7 + n) % 50


def test_ahead_gives_the_same_outputs_and_never_passes_max_tokens():
    out = {}
    for ahead in (False, True):
        books = BlockBooks(1 + 64, 4)
        sched, ex = Scheduler(books, max_batch=8, ahead=ahead), FakeExecutor(books, token=varied)
        gens = [gen(1, max_tokens=3), gen(2, max_tokens=6), gen(3, max_tokens=9), gen(4, max_tokens=1)]
        for g in gens:
            sched.add(g)
        plans = run_ahead(sched, ex)
        out[ahead] = [(g.token_ids, g.finish_reason) for g in gens], ex.fed, plans
        assert books.used_blocks == 0 and sched.take_released() + ex.released != []
    (outs, fed, plans), (outs_a, fed_a, plans_a) = out[False], out[True]
    assert outs == outs_a and outs[2] == ([varied(3, 3 + k) for k in range(4)] + [EOS], "stop")
    assert [p.follows for p in plans_a if p.follows] == [p.pass_id - 1 for p in plans_a if p.follows]
    assert sum(p.follows is not None for p in plans_a) == len(plans) - 2  # all but prefill, the first
    # max_tokens is known ahead: no pass feeds a sequence after its last token; only the one that
    # stopped on EOS was fed once more (its token of that pass was dropped)
    assert fed == {1: 3, 2: 6, 3: 5, 4: 1} and fed_a == {**fed, 3: 6}


def test_blocks_of_a_sequence_ending_in_flight_wait_for_the_pass_ahead():
    books = BlockBooks(1 + 8, 4)
    sched = Scheduler(books, max_batch=4, ahead=True)
    ex = FakeExecutor(books, token=lambda sid, n: EOS if sid == 1 and n == 3 + 1 else 7)
    a, b = gen(1, max_tokens=8), gen(2, max_tokens=8)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    assert sched.schedule_ahead() is None  # a prefill pass is not plain decoding
    sched.update(ex.execute(first))
    p2 = sched.schedule()
    p3 = sched.schedule_ahead()
    assert p2.decode and (p3.follows, p3.chunks, p3.released) == (p2.pass_id, [(1, []), (2, [])], ())
    assert sched.schedule() is None and sched.schedule_ahead() is None  # at most one ahead
    steps = sched.update(ex.execute(p2))  # a ends here (EOS) while p3 computes a token for it
    assert [(s.gen.seq_id, s.ids, s.finished) for s in steps] == [(1, [EOS], True), (2, [7], False)]
    assert 1 not in sched.running and 1 in books.tables  # p3 still writes its blocks
    p4 = sched.schedule_ahead()
    assert p4.seq_ids == [2] and p4.released == ()
    steps = sched.update(ex.execute(p3))
    assert [(s.gen.seq_id, s.ids) for s in steps] == [(2, [7])] and a.token_ids == [7, EOS]
    assert 1 not in books.tables  # freed once p3 is over, released by the next plan
    p5 = sched.schedule_ahead()
    assert p5.released == (1,) and p5.seq_ids == [2]


def test_cancel_and_failure_with_a_pass_ahead():
    books = BlockBooks(1 + 8, 4)
    sched, ex = Scheduler(books, max_batch=4, ahead=True), FakeExecutor(books)
    a, b = gen(1, max_tokens=8), gen(2, max_tokens=8)
    sched.add(a)
    sched.add(b)
    sched.update(ex.execute(sched.schedule()))
    p2 = sched.schedule()
    p3 = sched.schedule_ahead()
    assert sched.cancel(2) is False and b.cancelled  # in both passes in flight
    steps = sched.update(ex.execute(p2))
    assert [(s.gen.seq_id, s.ids, s.finished) for s in steps] == [(1, [7], False), (2, [], True)]
    assert 2 in books.tables
    p4 = sched.schedule_ahead()
    assert p4.seq_ids == [1]
    sched.update(ex.execute(p3))
    assert 2 not in books.tables and b.token_ids == [7]  # one token: the prefill's
    # the pass in flight fails: its sequences fail now, their blocks wait for the pass ahead
    p5 = sched.schedule_ahead()
    assert sched.fail_pass() == [a] and not sched.running and 1 in books.tables
    assert sched.schedule_ahead() is None and sched.schedule() is None  # p5 is still in flight
    assert sched.fail_pass() == [] and books.used_blocks == 0  # its executor failed it too
    assert (p5.follows, p5.released) == (p4.pass_id, (2,)) and sched.take_released() == [1]


def test_a_request_that_can_join_breaks_the_chain():
    books = BlockBooks(1 + 4, 4)  # 16 tokens: two requests of 3 + 5 (or fewer) at a time
    sched, ex = Scheduler(books, max_batch=4, ahead=True), FakeExecutor(books)
    a, b, c = gen(1, max_tokens=2), gen(2, max_tokens=5), gen(3, max_tokens=5)
    sched.add(a)
    sched.add(b)
    sched.update(ex.execute(sched.schedule()))
    p = sched.schedule()
    sched.add(c)  # no room: the chain goes on while it waits
    ahead = sched.schedule_ahead()
    assert ahead.seq_ids == [2] and list(sched.waiting) == [c]  # a's last token is p's
    sched.update(ex.execute(p))
    assert a.finish_reason == "length" and books.fits(sched.kv_need(c))
    assert sched.schedule_ahead() is None  # c could join now: no pass ahead
    sched.update(ex.execute(ahead))
    joined = sched.schedule()
    assert joined.new == {3: c.params} and joined.released == (1,) and not joined.decode
    assert Scheduler(books, max_batch=4).schedule_ahead() is None  # an executor without it


def test_no_pass_ahead_while_drafting():
    books = BlockBooks(1 + 8, 4)
    sched, ex = Scheduler(books, max_batch=4, draft_tokens=2, ahead=True), FakeExecutor(books)
    sched.add(gen(1, max_tokens=8))
    sched.add(gen(2, max_tokens=8, draft_tokens=0))
    sched.update(ex.execute(sched.schedule()))
    p = sched.schedule()
    assert p.draft == {1: 2} and not p.decode and sched.schedule_ahead() is None


def test_resolve_fills_the_placeholders_and_leaves_out_failed_rows():
    from gdsllm.engine.scheduler import PassPlan
    plan = PassPlan(6, [(1, []), (2, []), (3, [])], {}, {}, released=(4,), decode=True, follows=5)
    got = plan.resolve({1: [9, 11], 3: [12]})  # 1 accepted a draft first; 2's row failed
    assert (got.chunks, got.follows, got.released, got.pass_id) == ([(1, [11]), (3, [12])], None, (4,), 6)
    with pytest.raises(ValueError, match="no sequence of pass 5 sampled a token for pass 6"):
        plan.resolve({2: []})
