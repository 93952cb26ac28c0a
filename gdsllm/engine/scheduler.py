"""The scheduler: the one engine loop's policy, for every entry point (gdsllm.LLM, the service).
It only decides; executors run what it decides and report back (nano-vllm's LLMEngine.step:
schedule -> run -> postprocess; vLLM v1's SchedulerOutput: one plan per pass with everything the
executor needs). No sockets, no metrics, no torch: unit-testable with a fake executor.

    sched = Scheduler(BlockBooks(num_blocks, 16), max_batch=16, max_pass_tokens=8192, draft_tokens=4)
    sched.add(gen)                      # a Generation (gdsllm.engine.sequence) with a fresh seq_id
    while sched.has_work:
        plan = sched.schedule()         # PassPlan, or None: nothing may run now
        result = executor.execute(plan) # PassResult (gdsllm.engine.executor; the service's workers)
        for step in sched.update(result):   # Step: each sequence's new tokens and text delta
            ...                         # finished ones (step.finished) have left, blocks freed
    sched.fail_pass(why) -> [gen]       # the pass in flight produced nothing: its sequences fail
    sched.cancel(seq_id) -> bool        # True: gone now; False: in the pass in flight, leaves at update
    sched.remove(seq_id)                # gone now (failed by its caller), blocks freed
    sched.take_released()               # ids gone since the last plan, when no plan follows
    ahead = sched.schedule_ahead()      # the pass after the one in flight, before its tokens

What it owns:
- **Admission.** Requests wait in arrival order; one joins when the batch has room (max_batch)
  and the KV blocks of its prompt plus every token it may generate are free (gdsllm.engine.blocks),
  plus room for a token tree's branches when it drafts trees: no pass can run out of KV memory
  halfway. The head of the queue waits for memory, and so do
  those behind it (no overtaking: a long request is not starved).
- **The KV books.** A joining sequence's block table goes out in the plan (`tables`) once; the
  executor's cache is handed those ids and allocates nothing. Sequences that left are listed in
  the next plan (`released`): the executor drops its state for them first.
- **Chunked prefill.** Each pass feeds at most max_pass_tokens new tokens: decoding sequences one
  token each (never held back), then prompts already started, then new ones; a prompt longer than
  what is left continues next pass (`partial`: nothing is sampled for a chunk that does not end
  its prompt), so one huge prompt does not stall every other sequence for its whole prefill.
- **Draft lengths.** Each chunk that ends where the next token is predicted gets its draft count
  (its request's draft_tokens, else the engine's; never past what it may still generate).
- **Stop rules.** `update` appends the tokens to each Generation, whose rules (eos, stop ids, stop
  strings, max_tokens, the context) end it; the rest of a pass's tokens after the end are dropped.

- **A pass ahead** (vLLM v1's asynchronous scheduling; only for an executor made with
  `ahead=True`, one that runs every unit of a pass without further messages: the service when
  everything is resident, there is no mixture of experts and no draft). The next pass needs this
  one's tokens, so normally one pass is in flight; but while the pass in flight is plain decoding
  (`decode`: every chunk one decoding sequence's last token; no prompt chunk, no new sequence,
  no draft), `schedule_ahead()` plans the one after it at once, the same sequences decoding again,
  each chunk's token left to the executor (`follows`: the token the sequence samples in that
  pass; `PassPlan.resolve`). Never a sequence that pass ends by max_tokens (known ahead), nor a
  cancelled one; never when a waiting request could join now (it joins at the next schedule(),
  which breaks the chain); at most one pass ahead. A sequence that ends in the pass in flight
  (stop, eos, cancel, error) has its token of the pass ahead dropped at that pass's update, and
  its KV blocks are freed, like those of any sequence removed while a pass that writes them is
  in flight, only once the last such pass is over (updated or failed).

Otherwise one pass is in flight at a time. `gdsllm.LLM` schedules synchronously (its executor
starts a pass only when the last one returned: nothing to overlap in one thread). What the weights do
(residency, the prefetch window, expert slots) is the VRAM ledger's plan (gdsllm.engine.budget),
which both executors follow.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from gdsllm.engine.adaptive_k import TREE_MAX
from gdsllm.engine.blocks import BlockBooks
from gdsllm.engine.sampling import AUTO_TREE, SamplingParams
from gdsllm.engine.sequence import Generation

DEFAULT_MAX_PASS_TOKENS = 8192  # new tokens per pass (--max-pass-tokens): chunked prefill


@dataclass(frozen=True)
class PassPlan:
    """Everything an executor needs for one weight pass."""

    pass_id: int
    chunks: list[tuple[int, list[int]]]  # (seq_id, new token ids), in batch order
    new: dict[int, SamplingParams]  # sequences joining in this pass: their sampler's parameters
    tables: dict[int, list[int]]  # the KV block ids of each joining sequence
    partial: frozenset[int] = frozenset()  # mid-prompt chunks: nothing sampled for them
    draft: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens to draft and verify
    released: tuple[int, ...] = ()  # sequences gone since the last plan: free their state first
    decode: bool = False  # plain decoding: every chunk one decoding sequence's last token, no draft
    follows: int | None = None  # scheduled ahead: each chunk's token is the one its sequence
    # samples in pass `follows` (its token lists are empty until `resolve`)

    @property
    def seq_ids(self) -> list[int]:
        return [sid for sid, _ in self.chunks]

    @property
    def tokens(self) -> int:
        return sum(len(t) for _, t in self.chunks)

    def resolve(self, sampled: dict[int, list[int]]) -> PassPlan:
        """A plan scheduled ahead with its tokens filled in from `sampled`, the tokens of pass
        `follows` (PassResult.tokens): each sequence's last one. A sequence with none there (its
        row failed: it is failed at that pass's update) is left out. ValueError when none is left."""
        assert self.follows is not None, "only a plan scheduled ahead is resolved"
        chunks = [(sid, sampled[sid][-1:]) for sid, _ in self.chunks if sampled.get(sid)]
        if not chunks:
            raise ValueError(f"no sequence of pass {self.follows} sampled a token for pass {self.pass_id}")
        return replace(self, chunks=chunks, follows=None)


@dataclass
class PassResult:
    """What one pass produced: `tokens[seq_id]` the drafts the target accepted, then its own
    sampled token (absent for partial chunks and failed rows); `failed[seq_id]` why a sequence's
    row could not be sampled (it alone fails); `proposed[seq_id]` drafts proposed (chain tokens
    or tree nodes)."""

    tokens: dict[int, list[int]]
    failed: dict[int, str] = field(default_factory=dict)
    proposed: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    draft_seconds: float = 0.0  # of the drafting in this pass


@dataclass
class Step:
    """One sequence's outcome of a pass: `ids` appended (cut at its end), the text `delta` that
    may be streamed now; `error` when its row failed; `finished` once it has left the batch."""

    gen: Generation
    ids: list[int]
    delta: str = ""
    error: str | None = None
    proposed: int | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.gen.cancelled or self.gen.finish_reason is not None


class Scheduler:
    def __init__(self, books: BlockBooks, *, max_batch: int, max_pass_tokens: int = 0,
                 draft_tokens: int = 0, draft_tree: int | str | None = None, ahead: bool = False):
        """`max_pass_tokens`: new tokens per pass (chunked prefill), 0 for no limit;
        `draft_tokens`: the engine's default draft length (0: no draft); `draft_tree`: the
        engine's default token-tree size (None or 0: chains; "auto": up to TREE_MAX nodes);
        `ahead`: the executor runs passes scheduled ahead (schedule_ahead)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.books = books
        self.max_batch, self.max_pass_tokens, self.draft_tokens = max_batch, max_pass_tokens, draft_tokens
        self.tree_room = TREE_MAX if draft_tree == AUTO_TREE else (draft_tree or 0)
        self.waiting: deque[Generation] = deque()
        self.running: dict[int, Generation] = {}  # seq_id -> admitted (holds KV blocks)
        self.prefilled: dict[int, int] = {}  # seq_id -> prompt tokens fed, while not all are in
        self.released: list[int] = []
        self.in_flight: PassPlan | None = None  # the oldest pass sent whose result is not back
        self.ahead_ok = ahead
        self.ahead: PassPlan | None = None  # the pass scheduled ahead, sent after in_flight
        self.deferred: dict[int, int] = {}  # seq_id gone -> the pass after which its blocks free
        self.pass_id = 0

    # ------------------------------------------------------------------ requests

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_need(self, gen: Generation) -> int:
        """KV tokens `gen` holds from admission to its end: its prompt, every token it may
        generate, and, when it drafts token trees, room for a tree's branches past its last token
        (its draft_tree, else the engine's; the verification pass writes every node)."""
        room = 0
        if self.draft_tokens and gen.params.draft_tokens != 0:
            t = gen.params.draft_tree
            room = self.tree_room if t is None else t
        return len(gen.prompt_ids) + gen.max_new + room

    def never_fits(self, gen: Generation) -> str | None:
        """Why `gen` can never be admitted (its KV cache is larger than the whole cache), or None."""
        need = self.kv_need(gen)
        if self.books.ever_fits(need):
            return None
        tree = need - len(gen.prompt_ids) - gen.max_new
        return (f"its prompt ({len(gen.prompt_ids)} tokens) plus max_tokens ({gen.max_new})"
                f"{f' plus its draft tree ({tree})' if tree else ''} need {need} tokens of KV cache, "
                f"more than the whole cache holds ({self.books.capacity_tokens} tokens); lower "
                f"max_tokens or shorten the prompt")

    def add(self, gen: Generation) -> None:
        assert gen.seq_id not in self.running and gen not in self.waiting, gen.seq_id
        self.waiting.append(gen)

    def cancel(self, seq_id: int) -> bool:
        """Cancel a request: True when it left now, False when the pass in flight serves it (it
        leaves at that pass's update, as a finished Step)."""
        gen = self.running.get(seq_id)
        if gen is not None and self._last_pass_of(seq_id) is not None:
            gen.cancelled = True
            return False
        gen = gen or next((g for g in self.waiting if g.seq_id == seq_id), None)
        if gen is not None:
            gen.cancelled = True
        self.remove(seq_id)
        return True

    def remove(self, seq_id: int) -> None:
        """Forget a request (finished, failed or cancelled) and free its blocks, or, when a pass in
        flight writes them, once the last such pass is over."""
        for g in self.waiting:
            if g.seq_id == seq_id:
                self.waiting.remove(g)
                break
        self.prefilled.pop(seq_id, None)
        if self.running.pop(seq_id, None) is None:
            return
        last = self._last_pass_of(seq_id)
        if last is None:
            self._free(seq_id)
        else:
            self.deferred[seq_id] = last

    def _last_pass_of(self, seq_id: int) -> int | None:
        """The id of the last pass in flight that serves `seq_id`, or None."""
        return max((p.pass_id for p in (self.in_flight, self.ahead) if p is not None and seq_id in p.seq_ids),
                   default=None)

    def _free(self, seq_id: int) -> None:
        if self.books.free(seq_id):
            self.released.append(seq_id)

    def _pass_over(self, pass_id: int) -> None:
        """Pass `pass_id` is over (updated or failed): the blocks that waited for it are free."""
        for sid in [s for s, last in self.deferred.items() if last <= pass_id]:
            del self.deferred[sid]
            self._free(sid)

    def take_released(self) -> list[int]:
        """Sequences gone since the last plan, for an executor to drop now (no plan will carry them)."""
        out, self.released = self.released, []
        return out

    def reset(self, books: BlockBooks) -> list[Generation]:
        """The executor lost its state (new workers): the running sequences fail (returned), the
        waiting ones stay; `books` describe the new executor's cache."""
        lost = list(self.running.values())
        self.running.clear()
        self.prefilled.clear()
        self.released.clear()
        self.in_flight = self.ahead = None
        self.deferred.clear()
        self.books = books
        return lost

    # ------------------------------------------------------------------ passes

    def schedule(self) -> PassPlan | None:
        """The next pass, or None when one is in flight or nothing can run."""
        if self.in_flight is not None:
            return None
        budget = self.max_pass_tokens or float("inf")
        chunks, partial, new, tables = [], set(), {}, {}
        for sid, g in self.running.items():  # decoding: one token each, never held back
            if sid not in self.prefilled:
                chunks.append((sid, g.token_ids[-1:]))
                budget -= 1
        decoding = len(chunks)
        for sid, g in self.running.items():  # prompts already started, in arrival order
            if sid in self.prefilled and budget > 0:
                budget -= self._chunk(g, budget, chunks, partial)
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            g = self.waiting[0]
            need = self.kv_need(g)
            if not self.books.fits(need):
                break  # in order: it waits for KV memory, and so do those behind it
            self.waiting.popleft()
            tables[g.seq_id] = self.books.allocate(g.seq_id, need)
            self.running[g.seq_id], self.prefilled[g.seq_id] = g, 0
            new[g.seq_id] = g.params
            budget -= self._chunk(g, budget, chunks, partial)
        if not chunks:
            return None
        draft = {}
        for sid, _ in chunks:  # only chunks that end where the next token is predicted
            g = self.running[sid]
            k = 0 if sid in partial else draft_count(g.params.draft_tokens, self.draft_tokens,
                                                     g.max_new - len(g.token_ids))
            if k:
                draft[sid] = k
        self.pass_id += 1
        self.in_flight = PassPlan(self.pass_id, chunks, new, tables, frozenset(partial), draft,
                                  tuple(self.released), decode=decoding == len(chunks) and not draft)
        self.released = []
        return self.in_flight

    def schedule_ahead(self) -> PassPlan | None:
        """The pass after the one in flight, planned before its tokens are back (see "A pass
        ahead" above), or None: not a steady state of plain decoding, a pass is already ahead,
        a waiting request could join now, or every sequence ends in the pass in flight."""
        prev = self.in_flight
        if not self.ahead_ok or prev is None or self.ahead is not None or not prev.decode:
            return None
        if self.waiting and len(self.running) < self.max_batch and self.books.fits(self.kv_need(self.waiting[0])):
            return None  # it joins at the next schedule()
        chunks = []
        for sid in prev.seq_ids:
            g = self.running.get(sid)
            if g is None or g.cancelled:
                continue
            remaining = g.max_new - len(g.token_ids) - 1  # after its token of the pass in flight
            if remaining <= 0:
                continue  # max_tokens (or the context) ends it there
            if draft_count(g.params.draft_tokens, self.draft_tokens, remaining):
                return None  # it drafts: its tokens per pass are not known ahead
            chunks.append((sid, []))
        if not chunks:
            return None
        self.pass_id += 1
        self.ahead = PassPlan(self.pass_id, chunks, {}, {}, released=tuple(self.released), decode=True,
                              follows=prev.pass_id)
        self.released = []
        return self.ahead

    def _chunk(self, g: Generation, budget, chunks: list, partial: set) -> int:
        """Add the next piece of `g`'s prompt (at most `budget` tokens); returns its length."""
        pos = self.prefilled[g.seq_id]
        n = int(min(len(g.prompt_ids) - pos, budget))
        chunks.append((g.seq_id, g.prompt_ids[pos: pos + n]))
        if pos + n < len(g.prompt_ids):
            self.prefilled[g.seq_id] = pos + n
            partial.add(g.seq_id)
        else:
            del self.prefilled[g.seq_id]  # its prompt is all in: this pass samples its first token
        return n

    def update(self, result: PassResult) -> list[Step]:
        """Apply the pass's tokens; every sequence of the pass that got something, failed, was
        cancelled or finished has a Step, in batch order. Finished ones have left."""
        plan, self.in_flight, self.ahead = self.in_flight, self.ahead, None
        assert plan is not None, "update without a pass in flight"
        steps = []
        for sid in plan.seq_ids:
            g = self.running.get(sid)
            if g is None:
                continue  # removed meanwhile (its caller failed it, or it ended in the pass before)
            if sid in result.failed:
                step = Step(g, [], error=result.failed[sid])
            elif g.cancelled:
                step = Step(g, [])
            elif sid in result.tokens:
                step = Step(g, [], proposed=result.proposed.get(sid))
                for t in result.tokens[sid]:  # accepted drafts first; cut where the request ends
                    step.delta += g.append(t)
                    step.ids.append(t)
                    if g.finish_reason is not None:
                        break
            else:
                continue  # a mid-prompt chunk: nothing yet
            if step.finished:
                self.remove(sid)
            steps.append(step)
        self._pass_over(plan.pass_id)
        return steps

    def fail_pass(self) -> list[Generation]:
        """The pass in flight produced nothing usable (a worker error, a unit that did not load):
        its sequences' KV caches are undefined, so they leave; returned for their callers to fail.
        A pass ahead of it stays in flight (its executor fails it too, or runs it for nobody)."""
        plan, self.in_flight, self.ahead = self.in_flight, self.ahead, None
        if plan is None:
            return []
        failed = [self.running[sid] for sid in plan.seq_ids if sid in self.running]
        for g in failed:
            self.remove(g.seq_id)
        self._pass_over(plan.pass_id)
        return failed


def draft_count(requested: int | None, default: int, remaining: int) -> int:
    """Tokens to draft for a sequence this pass: its request's choice (None: `default`, which is
    0 without a draft), never more than the `remaining` tokens it may produce minus the target's
    own next one."""
    if not default:
        return 0
    return max(0, min(default if requested is None else requested, remaining - 1))
