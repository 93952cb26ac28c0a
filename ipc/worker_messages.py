"""The messages between the coordinator and its two workers (I/O and compute), over their PAIR
sockets: internal, trusted, never sized by a client. Encoded and validated by `ipc.codec` like
the client messages of `ipc.messages`, which re-exports every name here.

Units of fields: bytes for sizes and offsets, seconds for times.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .codec import message


# ---------------------------------------------------------------- start-up
#
# Both workers are spawned at once. The compute worker allocates the slot arena (it owns it: the
# weights it reads are memory of its own process, not a CUDA IPC mapping, which costs decode time)
# and says ComputeReady; the coordinator hands the arena to the I/O worker (AttachArena ->
# IoReady), then has the compute worker make its Runner in the memory left (MakeRunner ->
# RunnerReady). Any step may be answered by WorkerError(fatal=True) instead.


ARENA_BACKENDS = ("cpu", "cuda")  # ipc.arena's: POSIX shared memory, one cudaMalloc


def shm_prefix(pid: int) -> str:
    """The name every shared-memory arena ("cpu" backend; the handle is the name) made by
    process `pid` starts with: /dev/shm/gdsllm-<pid>-<random>."""
    return f"gdsllm-{pid}-"


def shm_names(pid: int) -> list[str]:
    """The shared-memory arenas process `pid` made that still exist (Linux: /dev/shm)."""
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix(pid)))
    except OSError:
        return []


def _check_arena(backend: str, handle: bytes, arena_bytes: int) -> None:
    if backend not in ARENA_BACKENDS:
        raise ValueError(f"unknown arena backend {backend!r}; expected one of {ARENA_BACKENDS}")
    if not handle:
        raise ValueError("the arena handle is empty")
    if arena_bytes <= 0:
        raise ValueError(f"arena_bytes must be positive, got {arena_bytes}")


@message("compute_ready")
@dataclass(frozen=True)
class ComputeReady:
    """Compute worker -> coordinator, its first message: it loaded the model's metadata and
    allocated the slot arena on `device` (POSIX shared memory on "cpu", one cudaMalloc on
    "cuda"). `handle` opens it in another process (the CUDA IPC handle bytes, or the
    shared-memory name encoded as UTF-8)."""

    pid: int
    device: str
    backend: str
    handle: bytes
    arena_bytes: int

    def __post_init__(self):
        _check_arena(self.backend, self.handle, self.arena_bytes)


@message("attach_arena")
@dataclass(frozen=True)
class AttachArena:
    """Coordinator -> I/O worker: open the compute worker's arena (ComputeReady's backend,
    handle and arena_bytes; `device`: the index of the CUDA device it is on) to read units into.
    Replied with IoReady, or WorkerError(fatal=True) if it cannot be opened. Loads before it are
    refused."""

    backend: str
    handle: bytes
    arena_bytes: int
    device: int = 0

    def __post_init__(self):
        _check_arena(self.backend, self.handle, self.arena_bytes)
        if self.device < 0:
            raise ValueError(f"device must be a device index, got {self.device}")


@message("io_ready")
@dataclass(frozen=True)
class IoReady:
    """I/O worker -> coordinator: the arena is open, Loads are served; `io_path` is how its reads
    reach the arena ("gds", "compat", "posix" or "buffered")."""

    pid: int
    io_path: str


@message("make_runner")
@dataclass(frozen=True)
class MakeRunner:
    """Coordinator -> compute worker, after IoReady (the I/O worker's device memory is then
    taken): build the Runner with its paged KV cache in the memory left and pin the `resident`
    units (unit -> arena offset, for good; their bytes are loaded before any pass runs them).
    Replied with RunnerReady, or WorkerError(fatal=True). Passes before it are refused."""

    resident: dict[int, int] = field(default_factory=dict)


@message("runner_ready")
@dataclass(frozen=True)
class RunnerReady:
    free_bytes: int | None = None  # device memory still free (CUDA), for the KV budget
    kv_tokens: int = 0  # tokens the worker's paged KV cache holds (0: not reported)
    kv_block_size: int = 0  # tokens per KV block: a sequence takes whole blocks


# ---------------------------------------------------------------- coordinator <-> I/O worker


RESIDENT = -1  # the `slot` of a resident unit in Load / Run / Loaded / Done (no streaming slot)


@message("load")
@dataclass(frozen=True)
class Load:
    """Read unit `unit` into the arena at byte `offset` (the slot `slot`)."""

    unit: int
    slot: int
    offset: int


@message("loaded")
@dataclass(frozen=True)
class Loaded:
    unit: int
    slot: int
    nbytes: int
    seconds: float
    io_path: str
    error: str | None = None


# ---------------------------------------------------------------- coordinator <-> compute worker


@dataclass(frozen=True)
class SeqSampling:
    """Sampling state of one sequence, sent when it joins (the generator lives in the worker)."""

    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    draft_tree: int | None = None  # token-tree nodes per pass (Generate.draft_tree)


@message("start_pass")
@dataclass(frozen=True)
class StartPass:
    """Begin a weight pass: the plan of the engine's scheduler (gdsllm.engine.scheduler.PassPlan)
    with its first Runs, one message. `chunks` are [seq_id, new token ids]; `sampling` and
    `tables` have an entry for each sequence new in this pass: its sampler's parameters and its
    KV block ids (the coordinator keeps the books; the worker allocates nothing). `released`:
    sequences gone since the last pass, whose state the worker drops first. `partial`: sequences
    whose chunk is not the end of their prompt (chunked prefill): no token is sampled for them,
    and PassResult leaves them out. `draft[seq_id] = k`: the worker's draft proposes up to k
    tokens after that chunk and the pass verifies them (speculative decoding; never for a
    `partial` chunk). `runs`: the pass's first Runs as [unit, slot, offset, count], run at once
    (all of a resident model's units: one message starts and runs the whole pass).

    `follows`: set on a pass scheduled ahead (gdsllm.engine.scheduler, schedule_ahead), sent
    while pass `follows` (= pass_id - 1) is still running: every chunk's token list is then empty,
    a placeholder for the one token that sequence samples in pass `follows`, which the worker
    takes from its own result of that pass (a sequence with none there is left out). Such a pass
    is plain decoding of sequences already known: no sampling, tables, partial or draft. When
    pass `follows` failed (or is not the worker's last pass), this one fails too. Without
    `follows` no chunk is empty."""

    pass_id: int
    chunks: list[tuple[int, list[int]]]
    sampling: dict[int, SeqSampling]
    partial: list[int] = field(default_factory=list)
    draft: dict[int, int] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)
    follows: int | None = None

    def __post_init__(self):
        if self.follows is None:
            if any(not toks for _, toks in self.chunks):
                raise ValueError(f"StartPass {self.pass_id}: an empty chunk outside a pass scheduled ahead")
            return
        if self.follows != self.pass_id - 1:
            raise ValueError(f"StartPass {self.pass_id}: follows pass {self.follows}, not the one before it")
        if any(toks for _, toks in self.chunks) or not self.chunks:
            raise ValueError(f"StartPass {self.pass_id}: a pass scheduled ahead has one empty "
                             f"(placeholder) chunk per sequence")
        if self.sampling or self.tables or self.partial or self.draft:
            raise ValueError(f"StartPass {self.pass_id}: a pass scheduled ahead has no new "
                             f"sequences, partial chunks or drafts")


@message("run")
@dataclass(frozen=True)
class Run:
    """Run unit `unit` of the current pass over the weights at arena byte `offset`. A resident
    run may name `count` consecutive resident units (offsets as MakeRunner.resident gave them):
    one message, and on CUDA one graph replay, for all of them. A run that ends at a
    mixture-of-experts block may lend `experts`: [expert unit, arena offset] of that layer's
    experts resident now; the worker runs those its router picks at once (a cache hit costs no
    round trip) and reports them with ExpertsDone after Routed."""

    unit: int
    slot: int
    offset: int
    count: int = 1
    experts: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if self.count < 1 or (self.count > 1 and self.slot != RESIDENT):
            raise ValueError(f"Run: count {self.count} (more than 1 only for resident units)")
        _check_placed(self.experts, "lent expert units")


@message("done")
@dataclass(frozen=True)
class Done:
    """Unit `unit` (and the `count` - 1 after it, as its Run named) finished on the device: slot
    `slot` may be reused."""

    unit: int
    slot: int
    seconds: float
    count: int = 1


@message("pass_result")
@dataclass(frozen=True)
class PassResult:
    """The pass's tokens: `tokens[seq_id]` the draft tokens the target accepted (speculative
    decoding), then its own sampled next token; `proposed[seq_id]` how many the draft proposed.
    Partial chunks have none. `failed[seq_id]`: why that sequence's logits could not be sampled
    (it has no token; only its request fails).
    `draft_seconds`: the time the worker spent drafting for this pass."""

    pass_id: int
    tokens: dict[int, list[int]]
    seconds: float
    proposed: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    draft_seconds: float = 0.0


def _check_experts(ids, what: str) -> None:
    if any(e < 0 for e in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{what} must be distinct non-negative indices, got {list(ids)[:8]}")


def _check_placed(pairs, what: str) -> None:
    """[expert unit, arena offset] pairs: distinct units, offsets not negative."""
    _check_experts([u for u, _ in pairs], what)
    if any(off < 0 for _, off in pairs):
        raise ValueError("arena offsets must be non-negative")


@message("routed")
@dataclass(frozen=True)
class Routed:
    """Compute -> coordinator, after the Done of a mixture-of-experts block unit `unit`: the
    experts (indices within the layer) its router picked for any token of pass `pass_id`, and
    `predicted`: those the next layer's router picks from this layer's hidden state (the guess
    the coordinator may prefetch; [] for the last layer). The routed experts the block's Run
    lent then run at once, answered by one ExpertsDone; the rest wait for RunExperts."""

    pass_id: int
    unit: int
    experts: list[int]
    predicted: list[int] = field(default_factory=list)

    def __post_init__(self):
        _check_experts(self.experts, "experts")
        _check_experts(self.predicted, "predicted")


@message("run_experts")
@dataclass(frozen=True)
class RunExperts:
    """Coordinator -> compute: run these expert units of the MoE block `unit` waiting in pass
    `pass_id`, each [expert unit index, arena byte offset]; answered by ExpertsDone (the slots
    may then be refilled). A block's routed experts may come in several RunExperts."""

    pass_id: int
    unit: int
    experts: list[tuple[int, int]]

    def __post_init__(self):
        if not self.experts:
            raise ValueError("run_experts without experts")
        _check_placed(self.experts, "expert units")


@message("experts_done")
@dataclass(frozen=True)
class ExpertsDone:
    """Compute -> coordinator: the expert units of a RunExperts finished (or were skipped, in a
    failed pass); their slots may be reused."""

    pass_id: int
    unit: int
    experts: list[int]
    seconds: float


@message("worker_error")
@dataclass(frozen=True)
class WorkerError:
    """A worker could not do what it was told; `fatal` means it is exiting. From the compute
    worker, `pass_id` / `unit` name the pass and unit that failed (None when not about one):
    the rest of that pass's Runs are acknowledged with Done without computing, no PassResult
    follows, and its sequences should be failed (released in the next StartPass)."""

    message: str
    fatal: bool = False
    pass_id: int | None = None
    unit: int | None = None


@message("shutdown")
@dataclass(frozen=True)
class Shutdown:
    pass
