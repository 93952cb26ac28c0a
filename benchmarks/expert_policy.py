"""Which expert cache policy (issue 12): a routing trace replayed against LRU, LFU, FIFO and
Belady's MIN (evicts the expert used farthest in the future: the best any policy can do without
reading ahead) and "layer" (evicts from the layer whose next turn is farthest: the one that just
ran, then the one before...; least recently used within it) at several cache sizes, on the CPU.

    PYTHONPATH=. python3 benchmarks/expert_policy.py --work /tmp/policy [--batch 8]
    PYTHONPATH=. python3 benchmarks/expert_policy.py --work /tmp/policy --layers 4 --tokens 8  # smoke

The trace: `gdsllm.LLM` generating greedy tokens (`--batch` sequences) on a synthetic model of
qwen3-30b-a3b's routing shape (48 layers, 128 experts, top-8; hidden size scaled down, int4) from
consecutive pieces of the GPL-3 text, recording the experts each layer's router picks in every decode
pass (the prompt's pass fills the cache first, as it does in the service). Each policy then runs
the trace as the service's cache does: per layer the hits first, then each miss is read into a
free slot or the victim's. Results: hit rate per policy and cache size (as a share of all
experts) to WORK/policy-batchB.json. The routing is the synthetic model's (close to uniform, like a
trained router under a load-balancing loss, see gdsllm.convert.synth); a trained model's temporal
locality is not in it.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, OrderedDict
from pathlib import Path

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("lru", "layer", "lfu", "fifo", "min")


def capture(model: Path, prompts: list[str], tokens: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """(prompt pass, decode passes): per pass, per layer, the routed experts (sorted)."""
    from gdsllm import LLM, SamplingParams
    from gdsllm.engine.experts import ExpertCache
    passes: list[list[list[int]]] = []
    run_layer = ExpertCache.run_layer

    def spy(self, runner, layer):
        if layer == 0:
            passes.append([])
        passes[-1].append(runner.pending_routing.experts())
        return run_layer(self, runner, layer)

    ExpertCache.run_layer = spy
    try:
        with LLM(str(model)) as llm:
            llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    finally:
        ExpertCache.run_layer = run_layer
    return passes[0], passes[1:]


def replay(policy: str, warm: list[list[int]], trace: list[list[list[int]]], slots: int) -> float:
    """Hit rate of `policy` with `slots` slots over the decode passes `trace` (after `warm`)."""
    layers = len(warm)
    seq: list[list[Key]] = [[(i, e) for e in es] for i, es in enumerate(warm)]
    seq += [[(i, e) for e in es] for layers in trace for i, es in enumerate(layers)]
    future: dict[Key, list[int]] = {}  # MIN: the steps (layer visits) each key is used at
    for t in range(len(seq) - 1, -1, -1):
        for k in seq[t]:
            future.setdefault(k, []).append(t)
    cache: OrderedDict[Key, None] = OrderedDict()  # oldest first (LRU: least recently used)
    freq: Counter = Counter()
    hits = routed = 0
    for t, keys in enumerate(seq):
        counted = t >= len(warm)
        for k in keys:
            future[k].pop()  # this use is now past
        for k in sorted(keys, key=lambda k: k not in cache):
            freq[k] += 1
            routed += counted
            if k in cache:
                hits += counted
                if policy in ("lru", "lfu", "layer"):
                    cache.move_to_end(k)
                continue
            if len(cache) >= slots:
                busy = set(keys)  # the layer's own experts stay until it has run
                cand = [c for c in cache if c not in busy] or list(cache)
                if policy == "lfu":
                    victim = min(cand, key=lambda c: freq[c])  # first-found: least recent on ties
                elif policy == "layer":  # the layer whose next turn is farthest, LRU within it
                    victim = min(cand, key=lambda c: (k[0] - c[0]) % layers)
                elif policy == "min":
                    victim = max(cand, key=lambda c: future[c][-1] if future[c] else len(seq))
                else:  # lru, fifo: the oldest entry
                    victim = cand[0]
                del cache[victim]
            cache[k] = None
    return hits / routed if routed else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1, help="sequences per pass (one prompt each)")
    ap.add_argument("--shares", default="0.05,0.10,0.19,0.25,0.5",
                    help="cache sizes as shares of all experts (0.19: the 4 GiB H200 run)")
    a = ap.parse_args()
    from gdsllm.convert.synth import synth
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / f"qwen3-moe-routing-{a.layers}"
    if not (model / "metadata.json").exists():
        synth(model, "qwen3-30b-a3b", layers=a.layers, dtype="bfloat16", quant="int4",
              overrides=dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                             moe_intermediate_size=128, vocab_size=4096))
    text, n = Path("/usr/share/common-licenses/GPL-3").read_text(), a.prompt_chars
    warm, trace = capture(model, [text[i * n: (i + 1) * n] for i in range(a.batch)], a.tokens)
    experts = a.layers * 128
    rows = []
    for share in (float(s) for s in a.shares.split(",")):
        slots = max(8, round(share * experts))
        row = {"share": share, "slots": slots,
               **{p: replay(p, warm, trace, slots) for p in POLICIES}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    distinct = sum(len(es) for layers in trace for es in layers) / len(trace) / a.layers
    out = {"layers": a.layers, "experts": experts, "batch": a.batch, "decode_passes": len(trace),
           "routed_per_layer": distinct, "rows": rows}
    dst = a.work / f"policy-batch{a.batch}.json"
    dst.write_text(json.dumps(out, indent=1))
    print(f"results in {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
