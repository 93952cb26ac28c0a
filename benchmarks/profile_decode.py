"""Where a resident decode token's time goes on the GPU: torch.profiler over `LLM` decode passes.

    PYTHONPATH=. python3 benchmarks/profile_decode.py --work /root/pf --layers 8 --out $OUT/profile.json

For each qtype (--qtypes, default float16,int4) it synthesizes the LLaMA-7B shape with --layers
blocks (`gdsllm synth --shape llama-7b`, int4 in groups of 128), opens `LLM(model, device="cuda")`
(everything resident, CUDA graphs), warms up, times decode per token at each batch (--batches) as
bench_loop.py does ((n tokens - 1 token) / (n - 1), best of 3), then profiles --profile-tokens
decode tokens at each batch and reports, per token:
- wall: the time per token on the host's clock,
- gpu_busy: the union of the kernels' intervals (so wall - gpu_busy is time the GPU sat idle,
  waiting for the host: launches, Python, synchronizations),
- kernels: their count and the top kernels by time (name, calls per token, us per token).
With --prefill N, the first token of an N-token prompt too: best of 3 unprofiled, its kernels and
host ops under torch.profiler, and its Python side under cProfile (where an eager pass's host
time goes). With --serve, the same model through `gdsllm serve` (one client, batch 1): ms/token on the
client's clock, and the compute worker's own trace (GDSLLM_TORCH_PROFILE, see
gdsllm.service.compute_worker) read the same way, per pass: the step's wall time, the GPU busy
time within it and the host ops that took longest.
Results: --out (JSON) and the tables on stdout. A tool for finding the next cost to remove, not a
benchmark row: its figures are made under the profiler.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PROMPT = "The storage hierarchy of a language model"


def synth(work: Path, shape: str, q: str, layers: int, group: int, dtype: str = "float16") -> Path:
    dst = work / f"{shape}-{layers}-{q}" if dtype == "float16" else work / f"{shape}-{layers}-{q}-{dtype}"
    if not dst.exists():
        cmd = [sys.executable, "-m", "gdsllm", "synth", str(dst), "--shape", shape, "--layers", str(layers), "--dtype", dtype]
        if q != "float16":
            cmd += ["--quant", q, "--group-size", str(group)]
        subprocess.run(cmd, check=True)
    return dst


def greedy(n: int):
    from gdsllm import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def kernels_of(trace: Path) -> list[dict]:
    return [e for e in json.loads(trace.read_text())["traceEvents"] if is_kernel(e)]


def is_kernel(e: dict) -> bool:
    return e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e


def top_kernels(ks: list[dict], passes: int, top: int) -> list[dict]:
    per = defaultdict(lambda: [0, 0.0])
    for k in ks:
        per[k["name"]][0] += 1
        per[k["name"]][1] += k["dur"]
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    return [{"name": n[:120], "calls_per_pass": c / passes, "us_per_pass": t / passes}
            for n, (c, t) in rows[:top]]


def serve_profile(model: Path, device: str, tokens: int, skip: int, passes: int, top: int) -> dict:
    """`gdsllm serve` at batch 1: ms/token on the client's clock, then one request long enough
    for the compute worker's profiler to record `passes` decode passes after `skip`."""
    import os
    from gdsllm.service.benchmark import Served
    with tempfile.TemporaryDirectory() as d:
        os.environ["GDSLLM_TORCH_PROFILE"] = f"{d}:{skip}:{passes}"
        try:
            with Served(model, device=device, extra=["--max-batch", "16"], startup_s=300.0) as srv:
                srv.decode(PROMPT, 4)  # warm-up
                one = min(srv.decode(PROMPT, 1).total_s for _ in range(3))
                full = min(srv.decode(PROMPT, tokens).total_s for _ in range(3))
                srv.decode(PROMPT, skip + passes + 8)  # the profiled passes, if not already
        finally:
            del os.environ["GDSLLM_TORCH_PROFILE"]
        traces = list(Path(d).glob("compute-*.json"))
        if not traces:
            return {"ms_per_token": (full - one) / (tokens - 1) * 1e3, "error": "no trace written"}
        events = json.loads(traces[0].read_text())["traceEvents"]
    ks = [e for e in events if is_kernel(e)]
    steps = sorted((e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")),
                   key=lambda e: e["ts"])
    per_step = []
    for st in steps:
        lo, hi = st["ts"], st["ts"] + st["dur"]
        inside = [(k["ts"], k["ts"] + k["dur"]) for k in ks if lo <= k["ts"] < hi]
        per_step.append({"wall_us": st["dur"], "gpu_busy_us": union(inside), "kernels": len(inside)})
    host = defaultdict(float)
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function", "user_annotation") and "dur" in e \
                and not str(e.get("name", "")).startswith("ProfilerStep#"):
            host[e["name"]] += e["dur"]
    n = max(len(steps), 1)
    return {"ms_per_token": (full - one) / (tokens - 1) * 1e3, "steps": per_step,
            "top": top_kernels(ks, n, top),
            "host_top": [{"name": k[:120], "us_per_pass": v / n}
                         for k, v in sorted(host.items(), key=lambda kv: -kv[1])[:top]]}


def profile(llm, prompts: list[str], tokens: int, top: int) -> dict:
    llm.generate(prompts, greedy(tokens + 1))  # warm-up of this batch (graphs captured)
    one = min(timed(lambda: llm.generate(prompts, greedy(1))) for _ in range(2))
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.profiler.profile(activities=acts) as prof:
            full = timed(lambda: llm.generate(prompts, greedy(tokens + 1)))
        prof.export_chrome_trace(str(trace))
        ks = kernels_of(trace)
    # Every kernel of both the prompt's pass and the decode passes is in the trace: per-pass
    # figures are over tokens + 1 passes, the prompt's included (approximate).
    busy = union([(k["ts"], k["ts"] + k["dur"]) for k in ks]) / 1e6
    passes = tokens + 1
    return {"batch": len(prompts), "tokens": tokens, "wall_ms_per_token": (full - one) / tokens * 1e3,
            "profiled_wall_s": full, "gpu_busy_s": busy, "gpu_busy_ms_per_pass": busy / passes * 1e3,
            "kernels_per_pass": len(ks) / passes,
            "top": top_kernels(ks, passes, top)}


def python_top(fn, top: int, key: int = 2) -> list[dict]:
    """cProfile of fn() (then a device sync): the `top` Python functions by their own time
    (key 2) or with their callees (key 3): where the host's time goes."""
    import cProfile
    import pstats
    cp = cProfile.Profile()
    cp.enable()
    fn()
    sync()
    cp.disable()
    rows = sorted(((f"{Path(f).name}:{line}:{name}", v[0], v[2], v[3])
                   for (f, line, name), v in pstats.Stats(cp).stats.items()), key=lambda r: -r[key])[:top]
    return [{"where": w, "calls": c, "tottime_ms": t * 1e3, "cumtime_ms": cum * 1e3} for w, c, t, cum in rows]


def host_decode(llm, prompts: list[str], tokens: int, top: int) -> dict:
    """The host's side of decode passes: cProfile over one generate of `tokens` tokens (the
    prompt's pass one of tokens + 1), by own time and with callees, per token."""
    llm.generate(prompts, greedy(tokens))  # warm-up
    wall = timed(lambda: llm.generate(prompts, greedy(tokens)))
    own = python_top(lambda: llm.generate(prompts, greedy(tokens)), top)
    cum = python_top(lambda: llm.generate(prompts, greedy(tokens)), top, key=3)
    per = lambda rows: [{**r, "tottime_us_per_token": r["tottime_ms"] * 1e3 / tokens,
                         "cumtime_us_per_token": r["cumtime_ms"] * 1e3 / tokens} for r in rows]
    return {"tokens": tokens, "wall_ms_per_token": wall / tokens * 1e3, "own": per(own), "cum": per(cum)}


def prefill(llm, vocab: int, n: int, top: int) -> dict:
    """The first token of an n-token prompt (token ids, as bench_loop.py's prefill row): best of 3
    unprofiled, then one under torch.profiler (kernels, GPU busy time, the host ops that took
    longest) and one under cProfile (the Python functions that took longest)."""
    ids = [(7 + 7919 * i) % (vocab - 8) + 4 for i in range(n)]
    llm.generate([ids], greedy(1))  # warm-up: the kernels of this row count
    best = min(timed(lambda: llm.generate([ids], greedy(1))) for _ in range(3))
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.profiler.profile(activities=acts) as prof:
            wall = timed(lambda: llm.generate([ids], greedy(1)))
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    py = python_top(lambda: llm.generate([ids], greedy(1)), top)  # the Python side of one more prefill
    ks = [e for e in events if is_kernel(e)]
    host = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") == "cpu_op" and "dur" in e:
            host[e["name"]][0] += 1
            host[e["name"]][1] += e["dur"]
    return {"prompt_tokens": n, "first_token_ms": best * 1e3, "profiled_ms": wall * 1e3,
            "gpu_busy_ms": union([(k["ts"], k["ts"] + k["dur"]) for k in ks]) / 1e3, "kernels": len(ks),
            "top": top_kernels(ks, 1, top),
            "host_top": [{"name": k[:120], "calls": c, "us": t}
                         for k, (c, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:top]],
            "python_top": py}


# issue 22's launch savings, each on or off: (x in plane order written by the norms and the
# activation, weights of one input in one launch)
ARMS = {"neither": (False, False), "planes": (True, False), "grouped": (False, True), "both": (True, True)}


def ab_arms(model: Path, device: str, batch: int, tokens: int, prefill_n: int, rounds: int = 2,
            only: tuple[str, ...] = tuple(ARMS)) -> dict:
    """Decode at `batch` (ms/token) and a prefill of `prefill_n` tokens (ms, best of 3) with each
    of issue 22's launch savings on and off: the norms and the activation writing the quantized
    matmuls' x in plane order (layers.rms_norm's `feeds`; off: layers._plane_index patched to
    None, a copy kernel per input) and the weights of one input in one launch
    (kernels_cuda.linears: q+k+v, gate+up; off: one linear each). Each arm its own LLM (its
    graphs captured that way), arms interleaved."""
    from gdsllm import LLM
    from gdsllm.format.metadata import load_model_meta
    from gdsllm.models import layers
    from gdsllm.quant import kernels_cuda
    vocab = load_model_meta(model).params.vocab_size
    ids = [(7 + 7919 * i) % (vocab - 8) + 4 for i in range(prefill_n)]
    prompts = [f"{PROMPT} {i}" for i in range(batch)]
    index, grouped = layers._plane_index, kernels_cuda.linears
    res = {arm: [] for arm in only}
    try:
        for _ in range(rounds):
            for arm, (planes, group) in ((a, ARMS[a]) for a in only):
                layers._plane_index = index if planes else (lambda *a: None)
                kernels_cuda.linears = grouped if group else (
                    lambda ws, x: tuple(kernels_cuda.linear(w, x) for w in ws))
                # a KV cache of its own size: by default each LLM takes 90% of the memory the
                # driver calls free, which the arms before it still hold in torch's cache, and
                # the sixth arm's capture then found no memory (seen on the H200, 2026-12-05)
                llm = LLM(str(model), device=device, max_batch=batch,
                          kv_tokens=fixed_kv_tokens(batch, tokens, prefill_n))
                ms = decode_ms(llm, prompts, tokens)
                llm.generate([ids], greedy(1))
                pre = min(timed(lambda: llm.generate([ids], greedy(1))) for _ in range(3)) * 1e3
                res[arm].append({"decode_ms_per_token": ms, "prefill_ms": pre})
                print(f"== {arm}: b{batch} {ms:.3f} ms/token, prefill {pre:.2f} ms", flush=True)
                llm.close()
                del llm
                gc.collect()
                torch.cuda.empty_cache()
    finally:
        layers._plane_index, kernels_cuda.linears = index, grouped
    return res


def fixed_kv_tokens(batch: int, tokens: int, prefill_n: int) -> int:
    """A KV cache for `batch` sequences of `tokens` plus their prompts and a `prefill_n`-token
    prompt: several LLMs in one process each get this, not 90% of what the driver calls free."""
    return batch * (tokens + 64) + 2 * prefill_n


def decode_ms(llm, prompts: list[str], tokens: int) -> float:
    llm.generate(prompts, greedy(tokens))
    one = min(timed(lambda: llm.generate(prompts, greedy(1))) for _ in range(3))
    full = min(timed(lambda: llm.generate(prompts, greedy(tokens))) for _ in range(3))
    return (full - one) / (tokens - 1) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/root/pf"))
    ap.add_argument("--shape", default="llama-7b", help="gdsllm synth --shape (tiny: a CPU check)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--qtypes", default="float16,int4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype", default="float16", help="stored dtype of the unquantized tensors (the compute dtype on CUDA)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens of the timed runs")
    ap.add_argument("--profile-tokens", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--prefill", type=int, default=0, help="also profile the first token of a prompt of this many tokens")
    ap.add_argument("--ab-arms", action="store_true", help="quantized models: decode at the largest --batches "
                    "and --prefill with x in plane order written by the norms, and weights of one input in one "
                    "launch, each on and off (ARMS), interleaved, then nothing else")
    ap.add_argument("--ab-rounds", type=int, default=2)
    ap.add_argument("--ab-only", default=",".join(ARMS), help="--ab-arms: these arms only")
    ap.add_argument("--serve", action="store_true", help="also through gdsllm serve, batch 1")
    ap.add_argument("--host", action="store_true", help="decode rows: cProfile of the host's side instead of "
                    "torch.profiler's kernels")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from gdsllm import LLM
    a.work.mkdir(parents=True, exist_ok=True)
    res = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
           "torch": torch.__version__, "layers": a.layers, "rows": {}}
    for q in a.qtypes.split(","):
        model = synth(a.work, a.shape, q, a.layers, a.group_size, a.dtype)
        batches = [int(x) for x in a.batches.split(",") if x]  # "": no decode rows
        if a.ab_arms:
            if q != "float16":
                b = max(batches)
                res["rows"][f"{q}_ab_arms"] = ab = ab_arms(model, a.device, b, a.tokens, a.prefill or 512,
                                                           a.ab_rounds, tuple(a.ab_only.split(",")))
                for arm, runs in ab.items():
                    print(f"== {q} {arm}: " + "; ".join(f"b{b} {r['decode_ms_per_token']:.3f} ms/token, prefill "
                                                         f"{r['prefill_ms']:.2f} ms" for r in runs), flush=True)
                if a.out:
                    a.out.write_text(json.dumps(res, indent=1))
            continue
        llm = LLM(str(model), device=a.device, max_batch=max(batches, default=1))
        for b in batches:
            prompts = [PROMPT] if b == 1 else [f"{PROMPT} {i}" for i in range(b)]
            row = {"ms_per_token": decode_ms(llm, prompts, a.tokens)}
            if a.host:
                row["host"] = h = host_decode(llm, prompts, a.tokens, a.top)
                print(f"\n== {q} ({a.dtype}) batch {b}: {row['ms_per_token']:.3f} ms/token; host (cProfile) "
                      f"{h['wall_ms_per_token']:.3f} ms/token unprofiled", flush=True)
                for kind in ("cum", "own"):
                    for t in h[kind]:
                        print(f"  {kind} {t['tottime_us_per_token']:8.1f} us own {t['cumtime_us_per_token']:8.1f} us "
                              f"with callees {t['calls'] / a.tokens:6.1f}x  {t['where']}")
                res["rows"][f"{q}_{a.dtype}_b{b}"] = row
                if a.out:
                    a.out.write_text(json.dumps(res, indent=1))
                continue
            row.update(profile(llm, prompts, a.profile_tokens, a.top))
            res["rows"][f"{q}_{a.dtype}_b{b}"] = row
            print(f"\n== {q} ({a.dtype}) batch {b}: {row['ms_per_token']:.3f} ms/token unprofiled, "
                  f"{row['wall_ms_per_token']:.3f} profiled; GPU busy {row['gpu_busy_ms_per_pass']:.3f} "
                  f"ms/pass, {row['kernels_per_pass']:.0f} kernels/pass", flush=True)
            for t in row["top"]:
                print(f"  {t['us_per_pass']:9.1f} us {t['calls_per_pass']:6.1f}x  {t['name']}")
            if a.out:
                a.out.write_text(json.dumps(res, indent=1))
        if a.prefill:
            from gdsllm.format.metadata import load_model_meta
            row = prefill(llm, load_model_meta(model).params.vocab_size, a.prefill, a.top)
            res["rows"][f"{q}_{a.dtype}_prefill{a.prefill}"] = row
            print(f"\n== {q} ({a.dtype}) prefill {a.prefill}: {row['first_token_ms']:.2f} ms unprofiled, "
                  f"{row['profiled_ms']:.2f} profiled; GPU busy {row['gpu_busy_ms']:.2f} ms, {row['kernels']} kernels", flush=True)
            for t in row["top"]:
                print(f"  {t['us_per_pass']:9.1f} us {t['calls_per_pass']:6.1f}x  {t['name']}")
            for t in row["host_top"]:
                print(f"  host {t['us']:9.1f} us {t['calls']:5d}x  {t['name']}")
            for t in row["python_top"]:
                print(f"  python {t['tottime_ms']:8.2f} ms own {t['cumtime_ms']:8.2f} ms with callees "
                      f"{t['calls']:5d}x  {t['where']}")
            if a.out:
                a.out.write_text(json.dumps(res, indent=1))
        llm.close()
        del llm
        if a.serve:
            row = serve_profile(model, a.device, a.tokens, 20, a.profile_tokens, a.top)
            res["rows"][f"{q}_serve_b1"] = row
            print(f"\n== {q} serve batch 1: {row['ms_per_token']:.3f} ms/token", flush=True)
            for st in row.get("steps", []):
                print(f"  pass: wall {st['wall_us']:8.1f} us, GPU busy {st['gpu_busy_us']:8.1f} us, "
                      f"{st['kernels']} kernels")
            for t in row.get("host_top", []):
                print(f"  host {t['us_per_pass']:9.1f} us  {t['name']}")
            for t in row.get("top", []):
                print(f"  {t['us_per_pass']:9.1f} us {t['calls_per_pass']:6.1f}x  {t['name']}")
            if a.out:
                a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
