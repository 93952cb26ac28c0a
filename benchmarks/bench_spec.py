"""Speculative decoding on the GPU: the 7B float16 model streamed at a budget, without a draft and
with its own int4 copy as a resident draft (fixed K, adaptive K), in one run (issue 13). No
figures are claimed before it has run.

On the lent GPU, as root (it drops the page cache), from the repository root; the paths are
those of bench_quant.py, so `benchmarks/gpu_session.sh prep` has made the models already:

    PYTHONPATH=. python3 benchmarks/bench_spec.py --work /root/gq      # gpu_session.sh spec
    PYTHONPATH=. python3 benchmarks/bench_spec.py --work /root/gq --parts nodraft,fixed
    PYTHONPATH=. python3 benchmarks/bench_spec.py --work /tmp/bs --shape smollm2-135m --layers 4 \\
        --device cpu --tokens 4 --budget auto                           # smoke test, any machine

Parts (in order; results accumulate in WORK/results-spec.json, so they may run in separate
calls on one machine): models (WORK/model and its Hugging Face copy WORK/model-hf by `gdsllm
synth --shape S --dtype float16`, and the draft WORK/model-int4 by `gdsllm convert --quant int4
--group-size G`, on the GPU when there is one, each only if missing), nodraft, fixed (--draft
WORK/model-int4 --draft-tokens K --no-draft-adaptive), adaptive (--draft-adaptive), table. Each
decode part starts `gdsllm serve` at the same --budget (the draft's bytes come out of it), decodes
--tokens greedy tokens for each prompt, cold on CUDA, and records s/token and, from /metrics,
draft tokens, accepted tokens and tokens per target pass; greedy tokens are compared with the
no-draft run. A random model's acceptance says nothing about a trained one's: pass --model /
--hf for real weights.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.bench_7b import run_parts, sh
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.benchmark import Served, drop_caches

PROMPTS = ["The history of the printing press begins", "def quicksort(items):",
           "In a small village at the edge of the forest,"]


def group_size(a) -> int:
    """The largest of 128, 64, 32 that divides the model's input dimensions (128: bench_quant's)."""
    p = load_model_meta(a.model).params
    return next(g for g in (128, 64, 32) if p.hidden_size % g == 0 and p.intermediate_size % g == 0)


def part_models(a, res):
    if not (a.model / "metadata.json").exists():
        cmd = [sys.executable, "-m", "gdsllm", "synth", str(a.model), "--shape", a.shape, "--dtype",
               "float16", "--hf-out", str(a.hf)]
        sh(cmd + (["--layers", str(a.layers)] if a.layers else []), a.log)
    if not (a.draft / "metadata.json").exists():
        src = a.hf if (a.hf / "config.json").exists() else a.model  # a GdsLLM model re-quantizes too
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "gdsllm", "convert", str(src), str(a.draft), "--quant", "int4",
            "--dtype", "float16", "--group-size", str(group_size(a))], a.log)
        res["convert_int4_s"] = time.perf_counter() - t0
    res["model_bytes"] = load_model_meta(a.model).total_bytes
    res["draft_bytes"] = load_model_meta(a.draft).total_bytes
    print("models", json.dumps({k: res[k] for k in ("model_bytes", "draft_bytes")}), flush=True)


def budget(a) -> str:
    """--budget, or with `auto` the least that streams every block: the draft, the target's other
    units and two streaming slots of its largest block (a smoke test)."""
    if a.budget != "auto":
        return a.budget
    meta = load_model_meta(a.model)
    blocks = [u.nbytes for u in meta.units if u.kind == "block"]
    return str(load_model_meta(a.draft).total_bytes + meta.total_bytes - sum(blocks) + 2 * max(blocks))


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def decode(a, res, key: str, extra: list[str]) -> None:
    cold = a.device == "cuda"  # dropping the page cache is for the lent machine, not a shared one
    if cold:
        drop_caches()
    t0 = time.perf_counter()
    with Served(a.model, device=a.device, vram_budget=budget(a), extra=extra, log=a.log) as srv:
        start_s = time.perf_counter() - t0
        port = int(srv.cmd[srv.cmd.index("--metrics-port") + 1])
        srv.decode("warm up", 2)
        base = scrape(port)
        runs = []
        for prompt in PROMPTS:
            if cold:
                drop_caches()
            r = srv.decode(prompt, a.tokens)
            runs.append({"prompt": prompt, "tokens": r.tokens, "s_per_token": r.total_s / r.tokens,
                         "decode_s_per_token": r.decode_s_per_token, "token_ids": r.token_ids})
        m = {k: v - base.get(k, 0.0) for k, v in scrape(port).items()}
        health = {"resident_units": len(srv.health.resident_units),
                  "streamed_units": srv.health.streamed_units}
    out = {"budget": budget(a), "startup_s": start_s, "runs": runs, "health": health,
           "s_per_token": sum(r["s_per_token"] for r in runs) / len(runs)}
    if extra:
        proposed = m.get("gdsllm_draft_tokens_total", 0.0)
        accepted = m.get("gdsllm_draft_accepted_tokens_total", 0.0)
        passes = m.get("gdsllm_tokens_per_target_pass_count", 0.0)
        out.update(proposed=proposed, accepted=accepted, wasted=proposed - accepted,
                   acceptance=accepted / proposed if proposed else 0.0, target_passes=passes,
                   tokens_per_target_pass=(m.get("gdsllm_tokens_per_target_pass_sum", 0.0) / passes
                                           if passes else 0.0))
    ref = res.get("nodraft", {}).get("runs")
    if extra and ref:
        out["greedy_identical"] = [x["token_ids"] == y["token_ids"] for x, y in zip(runs, ref)]
    res[key] = out
    print(key, json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)


def part_nodraft(a, res):
    decode(a, res, "nodraft", [])


def part_fixed(a, res):
    decode(a, res, "fixed", ["--draft", str(a.draft), "--draft-tokens", str(a.draft_tokens),
                             "--no-draft-adaptive"])


def part_adaptive(a, res):
    decode(a, res, "adaptive", ["--draft", str(a.draft), "--draft-tokens", str(a.draft_tokens),
                                "--draft-adaptive"])


def part_table(a, res):
    lines = [f"{a.model.name} ({res.get('model_bytes', 0) / 1e9:.2f} GB float16) at --vram-budget "
             f"{res.get('nodraft', {}).get('budget', a.budget)}, draft {a.draft.name} "
             f"({res.get('draft_bytes', 0) / 1e9:.2f} GB, resident, inside the budget), "
             f"{a.tokens} greedy tokens x {len(PROMPTS)} prompts, device {a.device}", "",
             "| run | s/token | acceptance | tokens/target pass | drafted | wasted | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for key, name in (("nodraft", "no draft"), ("fixed", f"K={a.draft_tokens}"),
                      ("adaptive", f"K<={a.draft_tokens} adaptive")):
        r = res.get(key)
        if r is None:
            continue
        if key == "nodraft":
            lines.append(f"| {name} | {r['s_per_token']:.3f} | - | 1 | - | - | - |")
        else:
            lines.append(f"| {name} | {r['s_per_token']:.3f} | {r['acceptance']:.2f} "
                         f"| {r['tokens_per_target_pass']:.2f} | {r['proposed']:.0f} "
                         f"| {r['wasted']:.0f} | {all(r.get('greedy_identical', [False]))} |")
    text = "\n".join(lines)
    print(text)
    (a.work / "table-spec.md").write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="target (default WORK/model)")
    ap.add_argument("--hf", type=Path, default=None, help="its HF copy (default WORK/model-hf)")
    ap.add_argument("--draft", type=Path, default=None, help="draft (default WORK/model-int4)")
    ap.add_argument("--shape", default="llama-7b", help="gdsllm synth --shape of a missing model")
    ap.add_argument("--layers", type=int, default=None, help="its blocks (default: the shape's)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--budget", default="8GiB", help="--vram-budget of every run; auto: the "
                    "least that streams every block (smoke tests)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--parts", default="models,nodraft,fixed,adaptive,table")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.model = a.model or a.work / "model"
    a.hf = a.hf or a.work / "model-hf"
    a.draft = a.draft or a.work / "model-int4"
    a.log = a.work / "bench-spec.log"
    parts = {name[5:]: f for name, f in globals().items() if name.startswith("part_")}
    run_parts(a, parts, a.work / "results-spec.json")


if __name__ == "__main__":
    main()
