"""The draft model of speculative decoding: small, fully resident, proposing tokens for the target.

    draft = DraftModel(draft_dir, device="cpu")          # every unit read once, kept in memory
    draft.size_kv(target_kv_tokens)                      # room for every sequence the target holds
    draft.assign(tables)                                 # new sequences' KV blocks: the target's ids
    check_draft(target_meta, draft.meta)                 # ValueError naming both models on mismatch
    props = draft.propose([(seq_id, tokens, k, sampler)])  # {seq_id: Proposal(tokens, probs)}
    draft.truncate(seq_id, n)                            # keep the first n tokens (rejections)
    trees = draft.propose_tree(items, {seq_id: 64})      # token trees (gdsllm.engine.tree)
    draft.keep(seq_id, start, path)                      # the accepted path of the last tree
    draft.release(seq_id)

    SelfDraft(target_meta, 4, device).attach(target_runner)   # --draft self:4: the target's own
                                                              # first 4 layers, read in place

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
from gdsllm.engine.tree import Calibration, TreeBuilder, TreeSpec, branch_probs
from gdsllm.models.views import unit_tensors
from gdsllm.engine.loader import UnitLoader
from gdsllm.format.metadata import ModelMeta, load_model_meta
from gdsllm.format.storage import aligned_host_buffer


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # q per token (sampled chains only)
    parents: list[int] | None = None  # a token tree (gdsllm.engine.tree): node i's parent; None: a chain
    tops: dict | None = None  # a drafted tree scored by a Calibration: node (-1: the root) -> the
    # draft's top probabilities and tokens after it, for the nodes it expanded (Calibration.observe_top)


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
        self.params = self.meta.params
        self.device = torch.device(device)
        self.size_kv(kv_tokens)
        self.weights = load_resident(self.meta, self.device)
        self.experts = {(u.layer, u.expert): u for u in self.meta.units if u.kind == "expert"}
        self.passes = 0  # draft passes run (each a pass over the resident draft)
        self._tree_slots: dict[int, dict[int, int]] = {}  # seq_id -> tree node -> its cache index - start

    def size_kv(self, kv_tokens: int | None) -> None:
        """A KV cache of `kv_tokens` tokens (None: the runner's default): the target's size, since
        the draft holds every sequence the target does. Only while no sequence is held."""
        if getattr(self, "runner", None) is not None and self.runner.sequences:
            raise RuntimeError("the draft's KV cache is resized only while it holds no sequence")
        self.runner = None  # the old cache goes before the new one is allocated
        self.runner = Runner(self.params, self.device, compute_dtype(self.device, self.meta.dtype, self.meta.qtypes),
                             architecture=self.meta.architecture, kv_tokens=kv_tokens)

    @property
    def kv_token_bytes(self) -> int:
        """KV cache bytes per token the draft holds (one for each token the target holds)."""
        return kv_bytes_per_token(self.params, compute_dtype(self.device, self.meta.dtype, self.meta.qtypes).itemsize)

    @property
    def nbytes(self) -> int:
        """Device bytes the draft's weights occupy (what the VRAM budget must set aside)."""
        return self.meta.total_bytes

    @property
    def max_context(self) -> int:
        return self.meta.params.max_position_embeddings

    def assign(self, tables: dict[int, list[int]]) -> None:
        """New sequences' KV block ids, the same the scheduler's books gave the target
        (gdsllm.engine.blocks): the draft's cache is as large as the target's and holds no more
        of a sequence than the target does, so one set of books serves both."""
        self.runner.assign(tables)

    def seq_len(self, seq_id: int) -> int:
        return self.runner.seq_len(seq_id)

    def truncate(self, seq_id: int, n: int) -> None:
        self.runner.truncate(seq_id, n)

    def release(self, seq_id: int) -> None:
        self.runner.release(seq_id)
        self._tree_slots.pop(seq_id, None)

    def keep(self, seq_id: int, start: int, path: list[int]) -> None:
        """The target accepted tree nodes `path` (indices into the last proposed tree of
        `seq_id`, root to leaf) after the sequence's first `start` tokens: the draft keeps those
        of them it has run (their keys and values moved behind the prefix), forgets the rest."""
        where = self._tree_slots.pop(seq_id, {})
        held = []
        for node in path:
            if node not in where:
                break
            held.append(start + where[node])
        self.runner.compact(seq_id, start, held)

    def _run_units(self) -> None:
        for u in self.meta.units:
            if u.kind == "expert":  # a mixture of experts: run as routed, after its block
                continue
            self.runner.run_unit(u, self.weights[u.name])
            if u.kind == "block" and self.experts:
                for e in self.runner.routed_experts():  # every expert is resident
                    unit = self.experts[(u.layer, e)]
                    self.runner.run_expert(unit, self.weights[unit.name])

    def _pass(self, chunks: list[tuple[int, list[int]]], trees=None) -> torch.Tensor:
        self.runner.start_pass(chunks, trees is not None, trees=trees)
        try:
            self._run_units()
            self.passes += 1
            return self.runner.end_pass()
        except BaseException:
            self.runner.abort_pass()
            raise

    def _feed(self, items) -> tuple[list[int], torch.Tensor]:
        """One pass feeding each sequence whatever of its tokens the draft's cache lacks: the
        sequences and the logits of each one's last token."""
        feed = {}
        for sid, tokens, _, _ in items:
            have = self.runner.seq_len(sid)
            assert have < len(tokens), f"draft of sequence {sid} holds {have} of {len(tokens)}"
            feed[sid] = list(tokens[have:])
        sids = list(feed)
        return sids, self._pass([(sid, feed[sid]) for sid in sids])

    def propose_tree(self, items: list[tuple[int, list[int], int, Sampler]], sizes: dict[int, int],
                     calibration: dict[int, Calibration] | None = None) -> dict[int, Proposal]:
        """A token tree of sizes[seq_id] nodes and depth at most k for each (seq_id, tokens, k,
        sampler), built best first (gdsllm.engine.tree.TreeBuilder), scored by
        calibration[seq_id] where given: one batched pass feeds the new tokens, then one per
        level over the nodes worth expanding (tree attention in the draft's own cache, after the
        sequence). keep() afterwards."""
        items = [it for it in items if it[2] > 0 and sizes.get(it[0], 0) > 0]
        if not items:
            return {}
        sids, logits = self._feed(items)
        info = {sid: (len(tokens), k, s) for sid, tokens, k, s in items}
        builders = {sid: TreeBuilder(sizes[sid], (calibration or {}).get(sid)) for sid in sids}
        for i, sid in enumerate(sids):
            builders[sid].add_children([-1], branch_probs(logits[i: i + 1], info[sid][2]))
        for level in range(1, max(k for _, k, _ in info.values())):
            todo = {}
            for sid, b in builders.items():
                if level < info[sid][1]:
                    nodes = b.to_expand(max(1, -(-b.size // info[sid][1])))
                    if nodes:
                        todo[sid] = nodes
            if not todo:
                break
            chunks, trees = [], {}
            for sid, nodes in todo.items():
                b = builders[sid]
                slot = {n: j for j, n in enumerate(b.fed)}
                for n in nodes:
                    slot[n] = len(slot)
                    b.expanded(n)
                parents = [slot[b.parents[n]] if b.parents[n] >= 0 else -1 for n in b.fed]
                chunks.append((sid, [b.tokens[n] for n in nodes]))
                trees[sid] = TreeSpec(info[sid][0], parents)
            logits = self._pass(chunks, trees)
            row = 0
            for sid, nodes in todo.items():
                rows = logits[row: row + len(nodes)]
                builders[sid].add_children(nodes, branch_probs(rows, info[sid][2]))
                row += len(nodes)
        out = {}
        for sid, b in builders.items():
            tokens, parents, ids = b.tree()
            where = {n: j for j, n in enumerate(b.fed)}
            self._tree_slots[sid] = {i: where[n] for i, n in enumerate(ids) if n in where}
            tops = {i: b.tops[n] for i, n in enumerate(ids) if n in b.tops}
            if -1 in b.tops:
                tops[-1] = b.tops[-1]
            out[sid] = Proposal(tokens, [], parents, tops if b.calibration is not None else None)
        return out

    def propose(self, items: list[tuple[int, list[int], int, Sampler]]) -> dict[int, Proposal]:
        """Up to k tokens for each (seq_id, tokens, k, sampler); one batched draft pass per
        proposed position. The draft's cache then holds tokens + all proposals but the last."""
        out = {sid: Proposal() for sid, _, _, _ in items}
        want = {sid: (k, s) for sid, _, k, s in items if k > 0}
        if not want:
            return out
        sids, logits = self._feed([it for it in items if it[2] > 0])
        while True:
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
            sids = [sid for sid in sids if len(out[sid].tokens) < want[sid][0]]
            if not sids:
                return out
            logits = self._pass([(sid, [picks[sid]]) for sid in sids])


class SelfDraft(DraftModel):
    """`--draft self:N` (LayerSkip, Draft&Verify): the target's own first N decoder layers, then
    its final norm and LM head. It reads the target's resident weights in place (`attach`, once
    the target's units are pinned), so it costs no bytes of the budget; only its KV cache of N
    layers is its own. Its proposals are those of an early exit of the target."""

    def __init__(self, target: ModelMeta, layers: int, device: str | torch.device = "cpu",
                 kv_tokens: int | None = None):
        from dataclasses import replace
        n = target.params.num_hidden_layers
        if not 1 <= layers < n:
            raise ValueError(f"--draft self:{layers}: N must be 1 to {n - 1} (the target has {n} "
                             f"decoder layers)")
        self.meta, self.layers = target, layers
        self.params = replace(target.params, num_hidden_layers=layers)
        self.device = torch.device(device)
        self.units = [u for u in target.units if u.kind in ("embed", "head")
                      or (u.kind in ("block", "expert") and u.layer < layers)]
        self.experts = {(u.layer, u.expert): u for u in self.units if u.kind == "expert"}
        self.weights: dict[str, dict] | None = None
        self.expert_source = None
        self.passes = 0
        self._tree_slots = {}
        self.size_kv(kv_tokens)

    nbytes = 0  # the target's own weights

    @property
    def max_context(self) -> int:
        return self.params.max_position_embeddings

    def attach(self, target: Runner, experts=None) -> None:
        """Read the weights from `target`'s pinned units (on the CPU through its float copies).
        ValueError naming the flag unless the embedding, the first N blocks and the head are
        resident; a mixture of experts' experts come from `target`'s pinned units or `experts`
        (an object with run_layer(runner, layer): gdsllm.engine.experts.ExpertCache)."""
        flag = f"--draft self:{self.layers}"
        missing = [u.name for u in self.units if u.kind != "expert" and u.index not in target.pinned]
        if missing:
            raise ValueError(f"{flag}: units {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                             f"are not resident under the VRAM budget; raise --vram-budget or lower N")
        if self.experts and any(u.index not in target.pinned for u in self.experts.values()):
            if experts is None:
                raise ValueError(f"{flag}: the experts of the first {self.layers} layers are not "
                                 f"resident here; use a model draft or ngram")
            self.expert_source = experts
        copies = target.host_copies
        self.weights = {}
        for u in self.units:
            if u.kind == "expert" and u.index not in target.pinned:
                continue
            w = target.pinned[u.index]
            self.weights[u.name] = copies.weights(u.index, w) if copies is not None else w
        if self.device.type == "cuda" and not self.experts:  # decode passes replay CUDA graphs
            for i, u in enumerate(self.units):
                self.runner.pin(i, self.weights[u.name])

    def _run_units(self) -> None:
        if self.weights is None:
            raise RuntimeError(f"--draft self:{self.layers}: attach() the target's runner first")
        for u in self.units:
            if u.kind == "expert":
                continue
            self.runner.run_unit(u, self.weights[u.name])
            if u.kind == "block" and self.experts:
                if self.expert_source is not None:
                    self.expert_source.run_layer(self.runner, u.layer)
                else:
                    for e in self.runner.routed_experts():
                        unit = self.experts[(u.layer, e)]
                        self.runner.run_expert(unit, self.weights[unit.name])


NGRAM = "ngram"  # --draft ngram: prompt lookup, no model
SELF = "self:"  # --draft self:N: the target's first N layers


def is_ngram(draft) -> bool:
    """Whether a --draft value names prompt lookup rather than a model directory."""
    return draft is not None and str(draft) == NGRAM


def self_layers(draft) -> int | None:
    """N of a `self:N` --draft value (ValueError if N is not a positive integer); None for
    anything else (a model directory, ngram)."""
    if draft is None or not str(draft).startswith(SELF):
        return None
    n = str(draft)[len(SELF):]
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--draft {draft}: N must be a positive number of layers (self:4)")
    return int(n)


def is_builtin(draft) -> bool:
    """Whether a --draft value needs no model directory and no bytes (ngram, self:N)."""
    return is_ngram(draft) or self_layers(draft) is not None


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

    def assign(self, tables: dict[int, list[int]]) -> None:
        """No KV cache: nothing to hand out."""

    def size_kv(self, kv_tokens: int | None) -> None:
        pass  # nothing is held per token

    def truncate(self, seq_id: int, n: int) -> None:
        pass

    def keep(self, seq_id: int, start: int, path: list[int]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass

    def lookup_all(self, tokens: list[int], k: int) -> list[list[int]]:
        """The continuations (up to k tokens each) of every earlier occurrence of the longest
        suffix of `tokens` (at most max_n long) found in `tokens`, the latest first."""
        import numpy as np
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                return [arr[h + n: h + n + k].tolist() for h in hits[::-1]]
        return []

    def propose_tree(self, items: list[tuple[int, list[int], int, Sampler]], sizes: dict[int, int],
                     calibration=None) -> dict[int, Proposal]:
        """A trie of the continuations lookup_all finds (the latest occurrence first), at most
        sizes[seq_id] nodes, k deep: every candidate the prompt and output suggest, one pass."""
        out = {}
        for sid, tokens, k, _ in items:
            size = sizes.get(sid, 0)
            if k <= 0 or size <= 0:
                continue
            toks, parents, index = [], [], {}
            for cont in self.lookup_all(tokens, k):
                node = -1
                for t in cont:
                    nxt = index.get((node, t))
                    if nxt is None:
                        if len(toks) >= size:
                            break
                        nxt = index[(node, t)] = len(toks)
                        toks.append(t)
                        parents.append(node)
                    node = nxt
                if len(toks) >= size:
                    break
            if toks:
                out[sid] = Proposal(toks, [], parents)
        return out

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        `tokens` (at most max_n long) found in `tokens`; [] when none is found."""
        found = self.lookup_all(tokens, k)
        return found[0] if found else []

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
