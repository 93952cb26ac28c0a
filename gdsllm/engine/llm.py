"""`gdsllm.LLM`: the single-process engine.

    from gdsllm import LLM, SamplingParams
    llm = LLM("~/models/smollm2", device="cpu")          # None: the embedded default model
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0))
    out.text, out.token_ids, out.finish_reason
    outs = llm.generate(["a", "b", [{"role": "user", "content": "Hi"}]], params)   # batched
    for delta in llm.stream("Tell me", params): print(delta, end="")
    LLM("~/models/llama-7b", device="cuda", vram_budget="4GiB")   # pin what fits, stream the rest
    llm = LLM(target_dir, draft=draft_dir, draft_tokens=4)   # speculative decoding (engine.speculative)

Weights live in one buffer laid out by the service's planner (gdsllm.engine.planner): what
`vram_budget` allows stays resident, loaded once at start-up; the rest is streamed every step
through `prefetch_window` rotating slots, read ahead by a reader thread while the device computes
(gdsllm.engine.prefetch), the same window and default as the service's `--prefetch-window`. Every
read goes through gdsllm.engine.loader (O_DIRECT `preadv` into host memory on
the CPU; KvikIO straight into CUDA memory, or O_DIRECT + copy without KvikIO), its checksum
verified on first read. The request rules (prompts, stop strings, eos, stop ids, max_tokens, the
context limit) are gdsllm.engine.sequence's, the service's own. The loop is the engine's one
loop, the service's too: the scheduler (gdsllm.engine.scheduler) plans each pass (admission, KV
blocks, chunked prefill, draft lengths), the in-process executor (gdsllm.engine.executor) runs it,
the scheduler applies its tokens; this is the reference the multi-process pipeline is tested
against.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from gdsllm.engine.blocks import BlockBooks
from gdsllm.engine.budget import DEFAULT_MAX_BATCH, free_device_bytes, parse_size, plan_memory, weights_budget
from gdsllm.engine.budget import kv_tokens as budget_kv_tokens
from gdsllm.engine.executor import LocalExecutor, PlanRunner
from gdsllm.engine.loader import UnitLoader
from gdsllm.engine.prefetch import Prefetch
from gdsllm.engine.runner import Runner, compute_dtype, reserve_scratch
from gdsllm.engine.sampling import SamplingParams
from gdsllm.engine.scheduler import DEFAULT_MAX_PASS_TOKENS, Scheduler
from gdsllm.engine.sequence import Generation, prompt_ids
from gdsllm.engine.tokenizer import Tokenizer
from gdsllm.models.views import unit_tensors
from gdsllm.format.metadata import load_model_meta
from gdsllm.format.storage import aligned_host_buffer

log = logging.getLogger("gdsllm.engine.llm")


@dataclass
class Output:
    text: str
    token_ids: list[int]  # generated ids (a final end-of-sequence / stop id included)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (eos, stop id or stop string) or "length"


def resolve(model: str | os.PathLike | None) -> Path:
    """`model` as a GdsLLM model directory; None: the embedded default (converted on first use)."""
    from gdsllm.convert.default_model import resolve_model
    return resolve_model(model)


class LLM:
    """The model on one device. `vram_budget`: bytes (or a size such as "4GiB") of device memory
    for weights (host memory on the CPU): a draft, resident units and `prefetch_window` streaming
    slots, as the service's --vram-budget. The default, None, keeps everything resident when the
    model fits in 90% of the device's free memory (free VRAM; MemAvailable on the CPU), and
    otherwise pins as much as fits there and streams the rest from storage every step. The KV
    cache takes its share of what is left (`kv_tokens` fixes it). The rules are the VRAM ledger's
    (gdsllm.engine.budget), the service's own. Prompts are batched by the engine's scheduler
    (gdsllm.engine.scheduler) as the service batches requests: at most `max_batch` at once, each
    admitted when the KV cache holds its prompt and max_tokens, prompts fed `max_pass_tokens` at
    a time. `cpu_exact`: on the CPU, resident quantized weights as float32 copies (float32
    math, exact against the dequantized reference) instead of the faster packed forms that
    round activations to bfloat16 (gdsllm.engine.host_copies). On the CPU a sequence decodes
    through each LLaMA block as one scripted call (the eager block's bits); `cpu_compile`: one
    torch.compile'd call instead (gdsllm.models.cpu_compiled), compiled here, at construction
    (5-10 s: worth it for long generations; not always eager's bits)."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu",
                 io: str = "direct", cudnn_attention: bool = False,
                 vram_budget: int | str | None = None, draft: str | os.PathLike | None = None,
                 draft_tokens: int = 4, kv_tokens: int | None = None, cuda_graphs: bool = True,
                 draft_adaptive: bool = True, prefetch_window: int = 2,
                 max_batch: int = DEFAULT_MAX_BATCH, max_pass_tokens: int = DEFAULT_MAX_PASS_TOKENS,
                 draft_tree: int | str | None = None, cpu_exact: bool = False,
                 cpu_compile: bool = False):
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if io not in ("direct", "buffered"):
            raise ValueError(f"io must be direct or buffered, got {io!r}")
        if isinstance(prefetch_window, bool) or not isinstance(prefetch_window, int) or not 1 <= prefetch_window <= 64:
            raise ValueError(f"prefetch_window must be 1 to 64, got {prefetch_window!r}")
        for name, v, low in (("max_batch", max_batch, 1), ("max_pass_tokens", max_pass_tokens, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {v!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA GPU is available to torch")
        self.meta = load_model_meta(resolve(model))
        self.dtype = compute_dtype(self.device, self.meta.dtype, self.meta.qtypes)
        self.tokenizer = Tokenizer(self.meta) if self.meta.tokenizer_file else None
        draft_meta = None
        if draft is not None:  # speculative decoding: the resident draft's bytes come first
            from gdsllm.engine.speculative import load_draft_meta
            draft_meta = load_draft_meta(self.meta, draft)
        # the VRAM ledger (gdsllm.engine.budget): the rules and defaults of `gdsllm serve`
        asked = parse_size(vram_budget) if isinstance(vram_budget, str) else vram_budget
        budget = weights_budget(asked, self.meta.total_bytes + (draft_meta.total_bytes if draft_meta else 0),
                                free_device_bytes(str(self.device)))
        self.memory = plan_memory(self.meta, budget=budget, window=prefetch_window, draft=draft_meta,
                                  itemsize=self.dtype.itemsize)
        self.plan, self._expert_slots = self.memory.weights, self.memory.expert_slots
        self.experts = self.prefetch = self.speculator = self.draft_tokens = None
        self.loader = UnitLoader(self.meta, self.device, direct=io == "direct")
        self.io_path = self.loader.io_path
        try:
            self._arena = (aligned_host_buffer(self.plan.arena_bytes) if self.device.type == "cpu"
                           else torch.empty(self.plan.arena_bytes, dtype=torch.uint8, device=self.device))
            if draft is not None:
                from gdsllm.engine.speculative import make_speculator
                self.speculator = make_speculator(self.meta, draft, self.device, draft_tokens,
                                                  adaptive=draft_adaptive, kv_tokens=1, tree=draft_tree)
                self.draft_tokens = draft_tokens
            reserve_scratch(self.device, self.dtype, (self.meta, draft_meta))
            if kv_tokens is None:  # what is left once the weights are allocated, as the service
                extra = self.speculator.draft.kv_token_bytes if self.speculator is not None else 0
                kv_tokens = budget_kv_tokens(self.meta.params, self.dtype.itemsize, device=str(self.device),
                                             free_bytes=free_device_bytes(str(self.device)),
                                             extra_per_token=extra, max_batch=max_batch)
            self.runner = Runner(self.meta.params, self.device, self.dtype,
                                 cudnn_attention=cudnn_attention, architecture=self.meta.architecture,
                                 kv_tokens=kv_tokens, cuda_graphs=cuda_graphs, cpu_exact=cpu_exact,
                                 cpu_compile=cpu_compile)
            if self.speculator is not None:  # the draft holds the same sequences: the same KV room
                self.speculator.draft.size_kv(self.runner.cache.capacity)
            self._load_resident()
            if self.speculator is not None:  # a self:N draft reads the resident units
                self.speculator.attach(self.runner, self.experts)
        except BaseException:
            self.close()
            raise
        cache = self.runner.cache
        self.scheduler = Scheduler(BlockBooks(cache.num_blocks, cache.block_size), max_batch=max_batch,
                                   max_pass_tokens=max_pass_tokens, draft_tokens=self.draft_tokens or 0,
                                   draft_tree=self.speculator.tree if self.speculator is not None else None)
        self.executor = LocalExecutor(self.meta, self.runner, self._resident, self.prefetch, self.experts,
                                      PlanRunner(self.runner, self.speculator))
        self._next_seq = 0
        self._errors: dict[int, str] = {}  # seq_id -> why its row failed (raised by its own caller)
        p = self.plan
        log.info("model %s: %d units, %s, %.1f MB; device %s (%s compute); io path %s; "
                 "%d units resident (%.1f MB), %d streamed per step", self.meta.root,
                 len(self.meta.units), self.meta.dtype, self.meta.total_bytes / 1e6, self.device,
                 str(self.dtype).removeprefix("torch."), self.io_path, len(p.resident_offsets),
                 p.resident_bytes / 1e6, len(p.streamed))

    def _load_resident(self) -> None:
        """Read (and verify) every resident unit once into the arena the plan lays out; set up the
        expert cache and the prefetch window over the rest of it."""
        es = self._expert_slots
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        for u, off in sorted(self.plan.resident_offsets.items()):
            unit = self.meta.units[u]
            buf = self._arena[off: off + unit.nbytes]
            self.loader.load(unit, buf)
            self._resident[u] = unit_tensors(unit, buf)
            self.runner.pin(u, self._resident[u])
        if es is not None:
            from gdsllm.engine.experts import ExpertCache
            self.experts = ExpertCache(self.meta, self._arena[es.offset:], es, self.loader)
        if self.plan.streamed:  # read ahead through the window, as the service's I/O worker does
            slots = [self._arena[off: off + self.plan.slot_bytes] for off in self.plan.slot_offsets]
            self.prefetch = Prefetch([self.meta.units[u] for u in self.plan.streamed], slots,
                                     self.loader, self.device)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None
        self.loader.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] of one fresh sequence, every position (one pass)."""
        seq = self._next_seq
        self._next_seq += 1
        books, ids = self.scheduler.books, list(token_ids)
        if not books.fits(len(ids)):
            raise ValueError(f"logits: {len(ids)} tokens do not fit the KV cache's "
                             f"{books.free_blocks} free blocks of {books.block_size} tokens")
        self.runner.start_pass([(seq, ids)], all_logits=True, tables={seq: books.allocate(seq, len(ids))})
        try:
            self.executor.run_units()
            return self.runner.end_pass()
        except BaseException:
            self.runner.abort_pass()
            self.executor.realign()
            raise
        finally:
            books.free(seq)
            self.runner.release(seq)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None):
        """One prompt -> Output; a list of prompts -> list[Output], generated as one batch."""
        batch = isinstance(prompts, list) and bool(prompts) and all(
            isinstance(x, (str, list)) for x in prompts)
        if isinstance(prompts, list) and not prompts:
            raise ValueError("generate: no prompts")
        gens = self._requests(prompts if batch else [prompts], params)
        for _ in self._run(gens):
            pass
        outs = [Output(g.text, g.token_ids, g.prompt_ids, g.finish_reason) for g in gens]
        return outs if batch else outs[0]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt's generation as they are produced (a tail that could still
        grow into a stop string is held back until it cannot)."""
        gens = self._requests([prompt], params)
        for deltas in self._run(gens):
            if deltas[0]:
                yield deltas[0]

    def _requests(self, prompts: list, params) -> list[Generation]:
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(plist)} SamplingParams")
        gens, p = [], self.meta.params
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):
            where = f"prompt {i}" if len(prompts) > 1 else "prompt"
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"{where}: params must be SamplingParams, got {type(sp).__name__}")
            sp.validate()
            ids = prompt_ids(prompt, self.tokenizer, p, where)
            detok = self.tokenizer.detokenizer(ids) if self.tokenizer is not None else None
            gen = Generation(ids, sp, p.eos_token_ids, p.max_position_embeddings, detok, self._next_seq)
            too_big = self.scheduler.never_fits(gen)
            if too_big:
                raise ValueError(f"{where}: {too_big}")
            gens.append(gen)
            self._next_seq += 1
        return gens

    def _run(self, gens: list[Generation]) -> Iterator[list[str]]:
        """Run passes until every one of `gens` has finished; yields each one's text delta after
        every pass. Passes serve every sequence the scheduler holds (another stream's too: each
        generation keeps its own text, so whichever loop ran a pass, every stream sees its own)."""
        sched, seen = self.scheduler, [0] * len(gens)
        for g in gens:
            sched.add(g)
        try:
            while any(g.finish_reason is None for g in gens):
                plan = sched.schedule()
                assert plan is not None, "admitted nothing though every request fits the cache"
                try:
                    result = self.executor.execute(plan)
                except BaseException:
                    sched.fail_pass()
                    raise
                for step in sched.update(result):
                    if step.error is not None:
                        self._errors[step.gen.seq_id] = step.error
                for g in gens:
                    why = self._errors.pop(g.seq_id, None)
                    if why is not None:
                        raise ValueError(f"sequence {g.seq_id}: {why}")
                deltas = []
                for i, g in enumerate(gens):
                    deltas.append(g.text[seen[i]: g.emitted])
                    seen[i] = max(seen[i], g.emitted)
                yield deltas
        finally:  # also on errors and abandoned streams: every KV cache of these goes
            for g in gens:
                sched.remove(g.seq_id)
                self._errors.pop(g.seq_id, None)
            if sched.in_flight is None:
                self.executor.plans.release(sched.take_released())
