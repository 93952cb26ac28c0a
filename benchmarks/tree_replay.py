"""Tokens per target pass of token trees and chains with `self:N`, replayed without the target's
passes (issue 23; the CPU stand-in for bench_tree.py's tree rows, whose 1000-node target passes
take seconds each on a CPU).

Greedy output with a draft is the output without one, so the target's choice at every position is
known in advance: its greedy continuation of each prompt, generated once. Each step then runs the
engine's own drafting (`SelfDraft.propose_tree` / `propose`, the Speculator's `Calibration`, the
same KV bookkeeping) and takes as accepted the longest prefix of that continuation the tree (or
chain) holds, plus the target's own next token: what the target pass would have accepted. The
calibration learns from it as `Speculator.finish` does. Validated against bench_tree.py on the
same prompts (docs/BENCHMARKS.md): identical pass counts for the chain and for trees.

    PYTHONPATH=. python3 benchmarks/tree_replay.py --model /tmp/bt/smollm2-f16 --tokens 64 8:0 8:1024
        # N:T per run; T = 0: a chain of --draft-tokens

Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_tree import PROMPTS


def continuations(model: Path, n: int) -> list[tuple[list[int], list[int]]]:
    from gdsllm import LLM, SamplingParams
    with LLM(str(model), device="cpu") as llm:
        return [(g.prompt_token_ids, g.token_ids) for g in
                (llm.generate(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p in PROMPTS)]


def replay(meta, target, refs, layers: int, size: int, depth: int, k: int) -> dict:
    from gdsllm.engine.draft import SelfDraft
    from gdsllm.engine.sampling import Sampler, SamplingParams
    from gdsllm.engine.tree import Calibration
    greedy = Sampler(SamplingParams(temperature=0))
    draft = SelfDraft(meta, layers, "cpu", kv_tokens=8 * (max(len(p) + len(r) for p, r in refs) + size))
    draft.attach(target)
    cal = Calibration()
    tokens = passes = 0
    widths, depths = [], []
    t0 = time.perf_counter()
    for sid, (prompt, ref) in enumerate(refs):
        i = 0
        while i < len(ref):
            h = prompt + ref[:i]
            if size == 0:
                prop = draft.propose([(sid, h, k, greedy)])[sid]
                a = 0
                while a < len(prop.tokens) and i + a < len(ref) and prop.tokens[a] == ref[i + a]:
                    a += 1
                draft.truncate(sid, len(h) + a)
            else:
                prop = draft.propose_tree([(sid, h, depth, greedy)], {sid: size}, {sid: cal})[sid]
                kids: dict[int, list[int]] = {}
                for j, parent in enumerate(prop.parents):
                    kids.setdefault(parent, []).append(j)
                node, path = -1, []
                while i + len(path) < len(ref):
                    want = ref[i + len(path)]
                    nxt = next((c for c in kids.get(node, ()) if prop.tokens[c] == want), None)
                    if nxt is None:
                        break
                    path.append(nxt)
                    node = nxt
                emitted = [prop.tokens[j] for j in path] + ref[i + len(path): i + len(path) + 1]
                for node, tok in zip([-1] + path, emitted):  # as Speculator.finish
                    if node in prop.tops:
                        q, ids = prop.tops[node]
                        hit = torch.nonzero(ids == tok).reshape(-1)
                        cal.observe_top(q, int(hit[0]) + 1 if hit.numel() else None)
                draft.keep(sid, len(h), path)
                a = len(path)
                widths.append(sum(1 for x in prop.parents if x < 0))
                depths.append(a)
            step = min(a + 1, len(ref) - i)
            i += step
            tokens += step
            passes += 1
        draft.release(sid)
    out = {"self_layers": layers, "tree": size, "tokens": tokens, "target_passes": passes,
           "tokens_per_target_pass": tokens / passes, "draft_passes": draft.passes,
           "seconds": time.perf_counter() - t0}
    if size:
        out.update(mean_root_width=sum(widths) / len(widths),
                   accepted_depths={d: depths.count(d) for d in sorted(set(depths))})
    else:
        out["draft_tokens"] = k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the target (SmolLM2 float16: bench_tree.py's)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--tree-depth", type=int, default=8)
    ap.add_argument("--draft-tokens", type=int, default=4, help="K of the chains")
    ap.add_argument("runs", nargs="+", help="N:T (T = 0: a chain)")
    a = ap.parse_args()
    from gdsllm.engine.draft import load_resident
    from gdsllm.engine.runner import Runner, compute_dtype
    from gdsllm.format.metadata import load_model_meta
    refs = continuations(a.model, a.tokens)
    meta = load_model_meta(a.model)
    target = Runner(meta.params, "cpu", compute_dtype(torch.device("cpu"), meta.dtype, meta.qtypes))
    weights = load_resident(meta, torch.device("cpu"))
    for u in meta.units:  # the weights self:N reads (in LLM: the target's resident units)
        target.pin(u.index, weights[u.name])
    for run in a.runs:
        n, t = (int(x) for x in run.split(":"))
        print(json.dumps(replay(meta, target, refs, n, t, a.tree_depth, a.draft_tokens)), flush=True)


if __name__ == "__main__":
    main()
