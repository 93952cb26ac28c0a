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
context limit) are gdsllm.engine.sequence's, the service's own. Each step runs all active
sequences at once; this is the reference the multi-process pipeline is tested against.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from gdsllm.engine.loader import UnitLoader
from gdsllm.engine.budget import free_device_bytes, parse_size, plan_memory, weights_budget
from gdsllm.engine.budget import kv_tokens as budget_kv_tokens
from gdsllm.engine.prefetch import Prefetch
from gdsllm.engine.runner import Runner, compute_dtype
from gdsllm.engine.sampling import Sampler, SamplingParams
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


@dataclass
class _Request:
    seq_id: int
    params: SamplingParams
    sampler: Sampler
    gen: Generation


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
    (gdsllm.engine.budget), the service's own."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu",
                 io: str = "direct", cudnn_attention: bool = False,
                 vram_budget: int | str | None = None, draft: str | os.PathLike | None = None,
                 draft_tokens: int = 4, kv_tokens: int | None = None, cuda_graphs: bool = True,
                 draft_adaptive: bool = True, prefetch_window: int = 2, draft_tree: int | str | None = None):
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if io not in ("direct", "buffered"):
            raise ValueError(f"io must be direct or buffered, got {io!r}")
        if isinstance(prefetch_window, bool) or not isinstance(prefetch_window, int) or not 1 <= prefetch_window <= 64:
            raise ValueError(f"prefetch_window must be 1 to 64, got {prefetch_window!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA GPU is available to torch")
        self.meta = load_model_meta(resolve(model))
        self.dtype = compute_dtype(self.device, self.meta.dtype)
        self.tokenizer = Tokenizer(self.meta) if self.meta.tokenizer_file else None
        draft_meta = None
        if draft is not None:  # speculative decoding: the resident draft's bytes come first
            from gdsllm.engine.speculative import load_draft_meta
            draft_meta = load_draft_meta(self.meta, draft)
        # the VRAM ledger (gdsllm.engine.budget): the rules and defaults of `gdsllm serve`
        asked = parse_size(vram_budget) if isinstance(vram_budget, str) else vram_budget
        budget = weights_budget(asked, self.meta.total_bytes + (draft_meta.total_bytes if draft_meta else 0),
                                free_device_bytes(str(self.device)))
        self.memory = plan_memory(self.meta, budget=budget, window=prefetch_window, draft=draft_meta)
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
            if kv_tokens is None:  # what is left once the weights are allocated, as the service
                extra = self.speculator.draft.kv_token_bytes if self.speculator is not None else 0
                kv_tokens = budget_kv_tokens(self.meta.params, self.dtype.itemsize, device=str(self.device),
                                             free_bytes=free_device_bytes(str(self.device)),
                                             extra_per_token=extra)
            self.runner = Runner(self.meta.params, self.device, self.dtype,
                                 cudnn_attention=cudnn_attention, architecture=self.meta.architecture,
                                 kv_tokens=kv_tokens, cuda_graphs=cuda_graphs)
            if self.speculator is not None:  # the draft holds the same sequences: the same KV room
                self.speculator.draft.size_kv(self.runner.cache.capacity)
            self._load_resident()
            if self.speculator is not None:  # a self:N draft reads the resident units
                self.speculator.attach(self.runner, self.experts)
        except BaseException:
            self.close()
            raise
        self._next_seq = 0
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

    # -- weights -------------------------------------------------------------------------------
    def _pass(self, chunks: list[tuple[int, list[int]]], all_logits: bool = False, *,
              logit_rows=None, trees=None) -> torch.Tensor:
        self.runner.start_pass(chunks, all_logits, logit_rows=logit_rows, trees=trees)
        try:
            for unit in self.meta.units:
                if unit.kind == "expert":  # read only when routed, through the expert cache
                    continue
                weights = self._resident.get(unit.index)
                if weights is not None:
                    self.runner.run_unit(unit, weights)
                else:  # streamed: read ahead by the prefetch window, its slot freed once run
                    self.runner.run_unit(unit, unit_tensors(unit, self.prefetch.take(unit)))
                    self.prefetch.release()
                if self.experts is not None and unit.kind == "block":
                    self.experts.run_layer(self.runner, unit.layer)
            return self.runner.end_pass()
        except BaseException:
            self.runner.abort_pass()
            if self.prefetch is not None:
                self.prefetch.realign()
            raise

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab] of one fresh sequence, every position (one pass)."""
        seq = self._next_seq
        self._next_seq += 1
        try:
            return self._pass([(seq, list(token_ids))], all_logits=True)
        finally:
            self.runner.release(seq)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None):
        """One prompt -> Output; a list of prompts -> list[Output], generated as one batch."""
        batch = isinstance(prompts, list) and bool(prompts) and all(
            isinstance(x, (str, list)) for x in prompts)
        if isinstance(prompts, list) and not prompts:
            raise ValueError("generate: no prompts")
        reqs = self._requests(prompts if batch else [prompts], params)
        for _ in self._run(reqs):
            pass
        outs = [Output(r.gen.text, r.gen.token_ids, r.gen.prompt_ids, r.gen.finish_reason)
                for r in reqs]
        return outs if batch else outs[0]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt's generation as they are produced (a tail that could still
        grow into a stop string is held back until it cannot)."""
        reqs = self._requests([prompt], params)
        for deltas in self._run(reqs):
            if deltas[0]:
                yield deltas[0]

    def _requests(self, prompts: list, params) -> list[_Request]:
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(plist)} SamplingParams")
        reqs, p = [], self.meta.params
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):
            where = f"prompt {i}" if len(prompts) > 1 else "prompt"
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"{where}: params must be SamplingParams, got {type(sp).__name__}")
            sp.validate()
            ids = prompt_ids(prompt, self.tokenizer, p, where)
            detok = self.tokenizer.detokenizer(ids) if self.tokenizer is not None else None
            gen = Generation(ids, sp, p.eos_token_ids, p.max_position_embeddings, detok)
            reqs.append(_Request(self._next_seq, sp, Sampler(sp), gen))
            self._next_seq += 1
        return reqs

    def _run(self, reqs: list[_Request]) -> Iterator[list[str]]:
        """Step all requests to completion; yields each request's text delta after every pass."""
        pending = {r.seq_id: r.gen.prompt_ids for r in reqs}
        active = list(reqs)
        try:
            while active:
                chunks = [(r.seq_id, pending[r.seq_id]) for r in active]
                if self.speculator is None:
                    logits = self._pass(chunks)
                    new = [[t] for t in Sampler.sample_batch(logits, [r.sampler for r in active])]
                else:
                    new = self._speculate(chunks, active)
                deltas = dict.fromkeys((r.seq_id for r in active), "")
                for r, ts in zip(active, new):
                    for t in ts:  # a speculative pass may bring several; stop where the request ends
                        deltas[r.seq_id] += r.gen.append(t)
                        if r.gen.finish_reason is not None:
                            break
                    pending[r.seq_id] = ts[-1:]
                    if r.gen.finish_reason is not None:
                        self._release(r.seq_id)
                active = [r for r in active if r.gen.finish_reason is None]
                yield [deltas.get(r.seq_id, "") for r in reqs]
        finally:
            for r in reqs:  # also on errors and abandoned streams: free every KV cache
                self._release(r.seq_id)

    def _speculate(self, chunks, active: list[_Request]) -> list[list[int]]:
        """One target pass verifying each request's draft tokens (k capped by what it may still
        produce); the new tokens of each request."""
        from gdsllm.engine.speculative import draft_count
        ks = {r.seq_id: draft_count(r.params.draft_tokens, self.draft_tokens,
                                    r.gen.max_new - len(r.gen.token_ids)) for r in active}
        samplers = {r.seq_id: r.sampler for r in active}
        trees = {r.seq_id: r.params.draft_tree for r in active}
        out = self.speculator.step(self._pass, chunks, ks, samplers, self.runner, trees)
        return [out[r.seq_id] for r in active]

    def _release(self, seq_id: int) -> None:
        self.runner.release(seq_id)
        if self.speculator is not None:
            self.speculator.release(seq_id)
