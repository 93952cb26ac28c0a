"""`gdsllm.LLM`: the single-process engine, one unit resident at a time.

    from gdsllm import LLM, SamplingParams
    llm = LLM("~/models/smollm2", device="cpu")          # None: the embedded default model
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=32, temperature=0))
    out.text, out.token_ids, out.finish_reason
    outs = llm.generate(["a", "b", [{"role": "user", "content": "Hi"}]], params)   # batched
    for delta in llm.stream("Tell me", params): print(delta, end="")
    llm = LLM(target_dir, draft=draft_dir, draft_tokens=4)   # speculative decoding (engine.speculative)

Every step is one pass over the model directory: each unit is read into ONE reusable buffer
(O_DIRECT `preadv` into host memory on the CPU; KvikIO straight into a CUDA buffer on the GPU, or
O_DIRECT + copy without KvikIO), its checksum verified on first read, viewed through the torch
bridge and run for all active sequences at once. This is the MVP path and the reference the
multi-process pipeline is tested against.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from gdsllm.engine.views import unit_tensors
from gdsllm.format.metadata import UnitMeta, load_model_meta, verify_unit
from gdsllm.engine.runner import Runner, compute_dtype
from gdsllm.engine.sampling import Sampler, SamplingParams
from gdsllm.format.storage import CudaReader, HostReader, _kvikio, aligned_host_buffer, probe_io_path
from gdsllm.engine.tokenizer import Tokenizer

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
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: object | None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # chars of `text` already streamed
    finish_reason: str | None = None


def resolve(model: str | os.PathLike | None) -> Path:
    """`model` as a GdsLLM model directory; None: the embedded default (converted on first use)."""
    from gdsllm.convert.default_model import resolve_model
    return resolve_model(model)


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, device: str = "cpu",
                 io: str = "direct", cudnn_attention: bool = False,
                 draft: str | os.PathLike | None = None, draft_tokens: int = 4):
        if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        if io not in ("direct", "buffered"):
            raise ValueError(f"io must be direct or buffered, got {io!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: no CUDA GPU is available to torch")
        self.meta = load_model_meta(resolve(model))
        p = self.meta.params
        self.dtype = compute_dtype(self.device, self.meta.dtype)
        self.tokenizer = Tokenizer(self.meta) if self.meta.tokenizer_file else None
        self.runner = Runner(p, self.device, self.dtype, cudnn_attention=cudnn_attention,
                             architecture=self.meta.architecture)
        direct = io == "direct"
        size = max(u.nbytes for u in self.meta.units)
        self._host = self._dev = self._cuda_reader = None
        if self.device.type == "cuda" and _kvikio() is not None:
            self._cuda_reader = CudaReader(direct=direct)
            self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.io_path = self._cuda_reader.path
        else:
            self._reader = HostReader(direct=direct)
            self._host = aligned_host_buffer(size)
            if self.device.type == "cuda":
                self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.io_path = probe_io_path("cpu", direct)
        self._verified: set[str] = set()
        self._next_seq = 0
        self.speculator = self.draft_tokens = None
        if draft is not None:
            from gdsllm.engine.speculative import make_speculator
            self.speculator = make_speculator(self.meta, draft, self.device, draft_tokens)
            self.draft_tokens = draft_tokens
        log.info("model %s: %d units, %s, %.1f MB; device %s (%s compute); io path %s",
                 self.meta.root, len(self.meta.units), self.meta.dtype, self.meta.total_bytes / 1e6,
                 self.device, str(self.dtype).removeprefix("torch."), self.io_path)

    def close(self) -> None:
        if self._cuda_reader is None:
            self._reader.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- weights -------------------------------------------------------------------------------
    def _load(self, unit: UnitMeta) -> dict[str, torch.Tensor]:
        """Read `unit` into the one buffer and view it; the caller fenced the previous unit."""
        path, n = self.meta.path(unit), unit.nbytes
        if self._cuda_reader is not None:
            self._cuda_reader.read(path, self._dev, n)
            buf = self._dev[:n]
        else:
            self._reader.read(path, self._host, n)
            buf = self._host[:n]
            if self._dev is not None:  # no KvikIO: O_DIRECT into host memory, then one copy
                self._dev[:n].copy_(buf)
                buf = self._dev[:n]
        if unit.name not in self._verified:
            verify_unit(self.meta, unit, buf)
            self._verified.add(unit.name)
        return unit_tensors(unit, buf)

    def _pass(self, chunks: list[tuple[int, list[int]]], *, logit_rows=None) -> torch.Tensor:
        self.runner.start_pass(chunks, logit_rows=logit_rows)
        try:
            for unit in self.meta.units:
                self.runner.fence()  # the buffer still feeds the previous unit's queued kernels
                self.runner.run_unit(unit, self._load(unit))
            return self.runner.end_pass()
        except BaseException:
            self.runner.abort_pass()
            raise

    # -- prompts -------------------------------------------------------------------------------
    def _prompt_ids(self, prompt, where: str) -> list[int]:
        p = self.meta.params
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"{where}: empty prompt")
            ids = self._tok(where).encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self._tok(where).encode_chat(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < p.vocab_size]
            if bad:
                raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {p.vocab_size})")
        else:
            raise ValueError(f"{where}: a prompt is a string, a list of token ids or a list of chat "
                             f"messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{where}: empty prompt (no tokens)")
        if len(ids) >= p.max_position_embeddings:
            raise ValueError(f"{where}: prompt of {len(ids)} tokens does not fit the model's context "
                             f"of {p.max_position_embeddings} tokens (room is needed for one more)")
        return ids

    def _tok(self, where: str) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{where}: the model has no tokenizer; pass token ids")
        return self.tokenizer

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
        outs = [Output(r.text, r.out_ids, r.prompt_ids, r.finish_reason) for r in reqs]
        return outs if batch else outs[0]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one prompt's generation as they are produced."""
        reqs = self._requests([prompt], params)
        for _ in self._run(reqs):
            r = reqs[0]
            hold = _stop_holdback(r.text, r.params.stop) if r.finish_reason is None else 0
            if len(r.text) - hold > r.emitted:
                yield r.text[r.emitted: len(r.text) - hold]
                r.emitted = len(r.text) - hold

    def _requests(self, prompts: list, params) -> list[_Request]:
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(plist)} SamplingParams")
        reqs = []
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):
            where = f"prompt {i}" if len(prompts) > 1 else "prompt"
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"{where}: params must be SamplingParams, got {type(sp).__name__}")
            sp.validate()
            ids = self._prompt_ids(prompt, where)
            detok = self.tokenizer.detokenizer(ids) if self.tokenizer is not None else None
            reqs.append(_Request(self._next_seq, ids, sp, Sampler(sp), detok))
            self._next_seq += 1
        return reqs

    def _run(self, reqs: list[_Request]) -> Iterator[None]:
        """Step all requests to completion; yields after every pass."""
        eos = set(self.meta.params.eos_token_ids)
        pending = {r.seq_id: r.prompt_ids for r in reqs}
        active = list(reqs)
        try:
            while active:
                chunks = [(r.seq_id, pending[r.seq_id]) for r in active]
                if self.speculator is None:
                    logits = self._pass(chunks)
                    new = [[t] for t in Sampler.sample_batch(logits, [r.sampler for r in active])]
                else:
                    new = self._speculate(chunks, active)
                for r, ts in zip(active, new):
                    for t in ts:  # a speculative pass may bring several; stop where the request ends
                        self._accept(r, t, eos)
                        if r.finish_reason is not None:
                            break
                    pending[r.seq_id] = ts[-1:]
                for r in active:
                    if r.finish_reason is not None:
                        self._release(r.seq_id)
                active = [r for r in active if r.finish_reason is None]
                yield
        finally:
            for r in reqs:  # also on errors and abandoned streams: free every KV cache
                self._release(r.seq_id)

    def _speculate(self, chunks, active: list[_Request]) -> list[list[int]]:
        """One target pass verifying each request's draft tokens (k capped by what it may still
        produce); the new tokens of each request."""
        from gdsllm.engine.speculative import draft_count
        ks = {r.seq_id: draft_count(r.params.draft_tokens, self.draft_tokens,
                                    r.params.max_tokens - len(r.out_ids)) for r in active}
        samplers = {r.seq_id: r.sampler for r in active}
        out = self.speculator.step(self._pass, chunks, ks, samplers, self.runner)
        return [out[r.seq_id] for r in active]

    def _release(self, seq_id: int) -> None:
        self.runner.release(seq_id)
        if self.speculator is not None:
            self.speculator.release(seq_id)

    def _accept(self, r: _Request, t: int, eos: set[int]) -> None:
        r.out_ids.append(t)
        sp = r.params
        if (t in eos and not sp.ignore_eos) or t in sp.stop_token_ids:
            r.finish_reason = "stop"
            if r.detok is not None:
                r.text += r.detok.flush()
            return
        if r.detok is not None:
            start = max(0, len(r.text) - max((len(s) for s in sp.stop), default=0))
            r.text += r.detok.push(t)
            hits = [i for i in (r.text.find(s, start) for s in sp.stop) if i >= 0]
            if hits:
                r.text = r.text[: min(hits)]
                r.finish_reason = "stop"
                return
        if len(r.out_ids) >= sp.max_tokens:
            r.finish_reason = "length"
        elif len(r.prompt_ids) + len(r.out_ids) >= self.meta.params.max_position_embeddings:
            r.finish_reason = "length"  # the context is full
        if r.finish_reason is not None and r.detok is not None:
            r.text += r.detok.flush()  # bytes of an unfinished character, as decode() shows them


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
