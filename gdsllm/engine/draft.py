"""The draft model of speculative decoding: small, fully resident, proposing tokens for the target.

    draft = DraftModel(draft_dir, device="cpu")          # every unit read once, kept in memory
    draft.size_kv(target_kv_tokens)                      # room for every sequence the target holds
    check_draft(target_meta, draft.meta)                 # ValueError naming both models on mismatch
    props = draft.propose([(seq_id, tokens, k, sampler)])  # {seq_id: Proposal(tokens, probs)}
    draft.truncate(seq_id, n)                            # keep the first n tokens (rejections)
    draft.release(seq_id)

`tokens` is the sequence as the target knows it (prompt and every token since); the draft feeds
itself whatever part of it its own KV cache does not hold yet, then proposes `k` tokens one pass
each, all sequences batched together. Greedy requests get the draft's argmax; sampled ones a draw
from the draft's own distribution under the request's parameters (`Proposal.probs`, q in the
speculative-sampling rule of gdsllm.engine.speculative), with the request's generator.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdsllm.models.kv_cache import kv_bytes_per_token
from gdsllm.engine.runner import Runner, compute_dtype
from gdsllm.engine.sampling import Sampler
from gdsllm.models.views import unit_tensors
from gdsllm.engine.loader import UnitLoader
from gdsllm.format.metadata import ModelMeta, load_model_meta
from gdsllm.format.storage import aligned_host_buffer


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # q per token (sampled requests only)


def check_draft(target: ModelMeta, draft: ModelMeta) -> None:
    """Raise ValueError unless `draft` speaks `target`'s vocabulary: the same number of logits and,
    where the models have tokenizers, the same token -> id table (names both models)."""
    where = f"draft model {draft.root} does not match target model {target.root}"
    if draft.params.vocab_size != target.params.vocab_size:
        raise ValueError(f"{where}: vocabulary of {draft.params.vocab_size} tokens, the target's "
                         f"has {target.params.vocab_size}")
    if bool(draft.tokenizer_file) != bool(target.tokenizer_file):
        has, lacks = (target, draft) if target.tokenizer_file else (draft, target)
        raise ValueError(f"{where}: {has.root} has a tokenizer, {lacks.root} has none")
    if target.tokenizer_file:
        from tokenizers import Tokenizer as HFTokenizer
        a = HFTokenizer.from_file(str(target.root / target.tokenizer_file)).get_vocab(True)
        b = HFTokenizer.from_file(str(draft.root / draft.tokenizer_file)).get_vocab(True)
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise ValueError(f"{where}: the tokenizers differ ({len(set(a.items()) ^ set(b.items()))} "
                             f"token ids disagree, e.g. {diff})")


def load_resident(meta: ModelMeta, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Every unit of `meta` read once into its own buffer on `device` and checksum verified,
    through gdsllm.engine.loader (the target's load path: KvikIO straight into VRAM on CUDA)."""
    out = {}
    with UnitLoader(meta, device) as loader:
        for u in meta.units:
            buf = (aligned_host_buffer(u.nbytes) if device.type == "cpu"
                   else torch.empty(u.nbytes, dtype=torch.uint8, device=device))
            loader.load(u, buf)
            out[u.name] = unit_tensors(u, buf[: u.nbytes])
    return out


class DraftModel:
    def __init__(self, model: str | os.PathLike | ModelMeta, device: str | torch.device = "cpu",
                 kv_tokens: int | None = None):
        self.meta = model if isinstance(model, ModelMeta) else load_model_meta(Path(model).expanduser())
        self.device = torch.device(device)
        self.size_kv(kv_tokens)
        self.weights = load_resident(self.meta, self.device)
        self.experts = {(u.layer, u.expert): u for u in self.meta.units if u.kind == "expert"}
        self.passes = 0  # draft passes run (each a pass over the resident draft)

    def size_kv(self, kv_tokens: int | None) -> None:
        """A KV cache of `kv_tokens` tokens (None: the runner's default): the target's size, since
        the draft holds every sequence the target does. Only while no sequence is held."""
        if getattr(self, "runner", None) is not None and self.runner.sequences:
            raise RuntimeError("the draft's KV cache is resized only while it holds no sequence")
        self.runner = None  # the old cache goes before the new one is allocated
        self.runner = Runner(self.meta.params, self.device, compute_dtype(self.device, self.meta.dtype),
                             architecture=self.meta.architecture, kv_tokens=kv_tokens)

    @property
    def kv_token_bytes(self) -> int:
        """KV cache bytes per token the draft holds (one for each token the target holds)."""
        return kv_bytes_per_token(self.meta.params, compute_dtype(self.device, self.meta.dtype).itemsize)

    @property
    def nbytes(self) -> int:
        """Device bytes the draft's weights occupy (what the VRAM budget must set aside)."""
        return self.meta.total_bytes

    @property
    def max_context(self) -> int:
        return self.meta.params.max_position_embeddings

    def seq_len(self, seq_id: int) -> int:
        return self.runner.seq_len(seq_id)

    def truncate(self, seq_id: int, n: int) -> None:
        self.runner.truncate(seq_id, n)

    def release(self, seq_id: int) -> None:
        self.runner.release(seq_id)

    def _pass(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        self.runner.start_pass(chunks)
        try:
            for u in self.meta.units:
                if u.kind == "expert":  # a mixture of experts: run as routed, after its block
                    continue
                self.runner.run_unit(u, self.weights[u.name])
                if u.kind == "block" and self.experts:
                    for e in self.runner.routed_experts():  # every expert is resident
                        unit = self.experts[(u.layer, e)]
                        self.runner.run_expert(unit, self.weights[unit.name])
            self.passes += 1
            return self.runner.end_pass()
        except BaseException:
            self.runner.abort_pass()
            raise

    def propose(self, items: list[tuple[int, list[int], int, Sampler]]) -> dict[int, Proposal]:
        """Up to k tokens for each (seq_id, tokens, k, sampler); one batched draft pass per
        proposed position. The draft's cache then holds tokens + all proposals but the last."""
        out = {sid: Proposal() for sid, _, _, _ in items}
        want = {sid: (k, s) for sid, _, k, s in items if k > 0}
        feed = {}
        for sid, tokens, k, _ in items:
            if k > 0:
                have = self.runner.seq_len(sid)
                assert have < len(tokens), f"draft of sequence {sid} holds {have} of {len(tokens)}"
                feed[sid] = list(tokens[have:])
        while feed:
            sids = list(feed)
            logits = self._pass([(sid, feed[sid]) for sid in sids])
            greedy = [i for i, sid in enumerate(sids) if want[sid][1].params.greedy]
            picks = dict.fromkeys(sids, 0)
            if greedy:
                idx = torch.tensor(greedy, device=logits.device)
                for i, t in zip(greedy, logits.index_select(0, idx).argmax(-1).tolist()):
                    picks[sids[i]] = t
            for i, sid in enumerate(sids):
                sampler = want[sid][1]
                if not sampler.params.greedy:
                    q = sampler.probs(logits[i])
                    picks[sid] = sampler.draw(q)
                    out[sid].probs.append(q)
                out[sid].tokens.append(picks[sid])
            feed = {sid: [picks[sid]] for sid in sids if len(out[sid].tokens) < want[sid][0]}
        return out


NGRAM = "ngram"  # --draft ngram: prompt lookup, no model


def is_ngram(draft) -> bool:
    """Whether a --draft value names prompt lookup rather than a model directory."""
    return draft is not None and str(draft) == NGRAM


class NgramDraft:
    """Prompt lookup (vLLM's ngram speculator, llama.cpp's lookup decoding): the continuation of
    the latest earlier occurrence of a sequence's last n tokens (n from `max_n` down to `min_n`) in
    its own prompt and output. No weights, no KV cache, no pass: it costs no bytes of the budget.
    Its proposal is a point mass, so sampled requests keep the target's distribution through the
    same rejection rule (accept d with probability p(d), else draw from p without d)."""

    passes = 0  # no draft passes: adaptive K sees no draft cost
    kv_token_bytes = 0
    nbytes = 0
    max_context = 1 << 62  # no context of its own

    def __init__(self, vocab_size: int, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.vocab_size, self.max_n, self.min_n = vocab_size, max_n, min_n

    def size_kv(self, kv_tokens: int | None) -> None:
        pass  # nothing is held per token

    def truncate(self, seq_id: int, n: int) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        `tokens` (at most max_n long) found in `tokens`; [] when none is found."""
        import numpy as np
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0 .. len-1-n
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start: start + k].tolist()
        return []

    def propose(self, items: list[tuple[int, list[int], int, Sampler]]) -> dict[int, Proposal]:
        out = {}
        for sid, tokens, k, sampler in items:
            drafts = self.lookup(tokens, k) if k > 0 else []
            prop = Proposal(drafts)
            if drafts and not sampler.params.greedy:
                for t in drafts:  # q: all mass on the proposed token
                    q = torch.zeros(self.vocab_size)
                    q[t] = 1.0
                    prop.probs.append(q)
            out[sid] = prop
        return out
