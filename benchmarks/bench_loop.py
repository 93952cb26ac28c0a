"""The benchmark rows of issues 21 and 22 in one run on a GPU machine (as root: it drops the page
cache), from the repository root:

    PYTHONPATH=. python3 benchmarks/bench_loop.py --work /root/gl --parts synth,quantize   # the models
    PYTHONPATH=. python3 benchmarks/bench_loop.py --work /root/gl --parts rows,table \
        --out $OUT/results-loop.json --deadline-s 400
    PYTHONPATH=. python3 benchmarks/bench_loop.py --quick     # the whole script on the CPU, a tiny model

Parts: synth (the LLaMA-7B shape in float16, `gdsllm synth`), quantize (`gdsllm convert MODEL DST
--quant int8|int4 --group-size 128`, the two at once: the re-quantize path of a GdsLLM model
directory), rows (below), table (markdown of the rows and the goals).

Rows, most important first, each in a process of its own (one failing or timed-out row loses
nothing else; past --deadline-s the rest are marked skipped), the results file rewritten after
each:
  llm_resident_Q    `LLM(model, device, max_batch=B)`, everything resident: decode ms/token at
                    batch 1 and aggregate tokens/s at batch B (best of 3 after a warm-up), then
                    the first token of a --prefill-tokens prompt (token ids, best of 3)
  serve_resident_Q  `gdsllm serve --max-batch B` (gdsllm.service.benchmark.Served): one request,
                    then B clients at once, timed the same way on the client's clock
  ceiling           the best raw cold reader of the float16 files (O_DIRECT preadv from 8 and 32
                    threads, and KvikIO on a GPU), page cache dropped before each
  llm_stream_Q      `LLM(model, device, vram_budget=--budget)`, page cache dropped, --stream-tokens
                    greedy tokens at batch 1: s/token, streamed GB/s and speed over the ceiling's
Decode time per token is (time for n tokens - time for 1 token) / (n - 1): greedy, ignore_eos,
the prompt's pass left out. Q is float16, int4, int8 in that order. The summary puts each figure
next to its goal in issue 21 or 22. Results: WORK/results-loop.json (and --out); synth and
quantize alone (the background step): WORK/results-prep.json.
"""
from __future__ import annotations

import argparse
import atexit
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_7b import kvikio_ceiling, run_parts, sh  # noqa: E402
from gdsllm.format.metadata import load_model_meta  # noqa: E402
from gdsllm.service.benchmark import Served, drop_caches, storage_ceiling  # noqa: E402

PROMPT = "The storage hierarchy of a language model"
QTYPES = ("float16", "int8", "int4")
ROWS = [("llm_resident_float16", "llm", "float16"), ("serve_resident_float16", "serve", "float16"),
        ("ceiling", "ceiling", "float16"), ("llm_stream_float16", "stream", "float16"),
        ("llm_resident_int4", "llm", "int4"), ("serve_resident_int4", "serve", "int4"),
        ("llm_resident_int8", "llm", "int8"), ("serve_resident_int8", "serve", "int8"),
        ("llm_stream_int4", "stream", "int4"), ("llm_stream_int8", "stream", "int8")]
# The 2 GiB streamed rows the issue 22 compares with: float16 and int4 as issue 22 quotes them
# (H200, 2026-12-03), int8 from docs/BENCHMARKS.md's quantized table (H200, 2026-11-28).
STREAM_BEFORE_S = {"float16": 5.56, "int4": 0.987, "int8": 2.410}
QUICK_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # group 128 divides


def model_dir(a, q: str) -> Path:
    return a.work / ("model" if q == "float16" else f"model-{q}")


# ---- the parts (the orchestrating process) ------------------------------------------------------

def part_synth(a, res):
    if (a.work / "model" / "metadata.json").exists():
        return
    shutil.rmtree(a.work / "model", ignore_errors=True)  # a partial one from a killed run
    t0 = time.perf_counter()
    if a.quick:  # a shape the CLI has no flag for: K of every projection divisible by 128
        from gdsllm.convert.synth import synth
        synth(a.work / "model", a.shape, layers=4, dtype="float16", seed=3, overrides=QUICK_SHAPE)
    else:
        sh([sys.executable, "-m", "gdsllm", "synth", str(a.work / "model"), "--shape", a.shape,
            "--dtype", "float16"], a.log)
    res["synth_s"] = time.perf_counter() - t0
    print("synth_s", res["synth_s"], flush=True)


def part_quantize(a, res):
    """int8 and int4 from the float16 model (`gdsllm convert` of a model directory re-quantizes
    it), both at once: quantization on the GPU if there is one, the writes overlapped."""
    procs = {}
    with open(a.log, "a") as log:
        for q in ("int8", "int4"):
            dst = model_dir(a, q)
            if (dst / "metadata.json").exists():
                continue
            shutil.rmtree(dst, ignore_errors=True)
            cmd = [sys.executable, "-m", "gdsllm", "convert", str(model_dir(a, "float16")), str(dst),
                   "--quant", q, "--group-size", "128", "--device", "cpu" if a.device == "cpu" else "auto"]
            print("+", " ".join(cmd), flush=True)
            procs[q] = (subprocess.Popen(cmd, stdout=log, stderr=log), time.perf_counter())
        for q, (p, t0) in procs.items():
            if p.wait() != 0:
                raise RuntimeError(f"gdsllm convert --quant {q} exited {p.returncode}; see {a.log}")
            res.setdefault("quantize_s", {})[q] = time.perf_counter() - t0
    res["model_bytes"] = {q: load_model_meta(model_dir(a, q)).total_bytes for q in QTYPES
                          if (model_dir(a, q) / "metadata.json").exists()}
    print("quantize_s", json.dumps(res.get("quantize_s", {})), "model_bytes", json.dumps(res["model_bytes"]),
          flush=True)


def part_rows(a, res):
    deadline = a.t0 + a.deadline_s if a.deadline_s else None
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    import torch
    if (a.work / "results-prep.json").exists():  # the background part's: synth and quantize times
        res["prep"] = json.loads((a.work / "results-prep.json").read_text())
    res["run"] = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": a.device, "gpu": gpu,
                  "torch": torch.__version__, "shape": a.shape, "tokens": a.tokens, "stream_tokens": a.stream_tokens,
                  "batch": a.batch, "max_batch": a.max_batch, "budget": a.budget, "prefill_tokens": a.prefill_tokens,
                  "quick": a.quick}
    wanted = a.rows.split(",") if a.rows else [k for k, _, _ in ROWS]
    for key, kind, q in ROWS:
        if key not in wanted:
            continue
        rows = res.setdefault("rows", {})
        left = deadline - time.monotonic() if deadline else None
        if not (model_dir(a, q) / "metadata.json").exists():
            rows[key] = {"skipped": f"no {q} model in {model_dir(a, q)}"}
        elif left is not None and left < a.min_row_s:
            rows[key] = {"skipped": f"{left:.0f} s left of --deadline-s {a.deadline_s:g}"}
        else:
            rows[key] = run_row(a, key, kind, q, left, rows.get("ceiling", {}).get("bytes_per_s"))
        print(f"== {key}", json.dumps(brief(rows[key])), flush=True)
        res["summary"] = summarize(res.get("rows", {}), a.batch, goals_apply=not a.quick)
        save(a, res)


def run_row(a, key: str, kind: str, q: str, timeout: float | None, ceiling: float | None) -> dict:
    """One row in a process (and session) of its own; on timeout the whole group (a service and
    its workers included) is killed and what the row had measured so far is kept."""
    partial, err = a.work / f"row-{key}.json", a.work / f"row-{key}.err"
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", kind, "--model", str(model_dir(a, q)),
           "--partial", str(partial), "--work", str(a.work), "--device", a.device,
           "--budget", quick_budget(model_dir(a, q)) if a.quick else a.budget,
           "--tokens", str(a.tokens), "--stream-tokens", str(a.stream_tokens), "--batch", str(a.batch),
           "--prefill-tokens", str(a.prefill_tokens), "--max-batch", str(a.max_batch)]
    if a.no_drop:
        cmd.append("--no-drop")
    if ceiling:
        cmd += ["--ceiling", repr(ceiling)]
    t0 = time.perf_counter()
    with open(err, "w") as ef:
        p = subprocess.Popen(cmd, stderr=ef, start_new_session=True)
        try:
            rc = p.wait(timeout)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            status = f"timed out after {timeout:.0f} s"
    try:
        out = json.loads(partial.read_text())
    except (OSError, ValueError):  # the row wrote nothing
        out = {}
    out["row_s"] = time.perf_counter() - t0
    if status != "ok":
        tail = [line for line in err.read_text().splitlines() if line.strip()][-3:]
        out["error"] = status + (": " + " | ".join(tail) if tail else "")
    return out


def brief(v):
    """`v` without its token ids (for the console)."""
    return {k: brief(x) for k, x in v.items() if k != "token_ids"} if isinstance(v, dict) else v


def save(a, res) -> None:
    text = json.dumps(res, indent=1)
    (a.work / "results-loop.json").write_text(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


# ---- the summary: each figure next to its goal ----------------------------------------------------

def summarize(rows: dict, batch: int, goals_apply: bool = True) -> dict:
    """Each figure of the goals of issues 21 and 22 that `rows` give, with its goal and whether
    it is met (`goals_apply` False, as for --quick's tiny CPU model: the figures only)."""
    def get(key, *path):
        v = rows.get(key, {})
        for p in path:
            v = v.get(p, {}) if isinstance(v, dict) else {}
        return v if isinstance(v, (int, float)) else None

    def ratio(x, y):
        return x / y if x is not None and y else None

    def ms(key):
        return get(key, "batch1", "ms_per_token")

    def agg(key, b=batch):
        return get(key, f"batch{b}", "aggregate_tok_per_s")

    f16, i4, i8 = "float16", "int4", "int8"
    goals = [  # (name, value, "<=" or ">=", target, issue)
        ("serve_b1_over_llm_b1_float16", ratio(ms(f"serve_resident_{f16}"), ms(f"llm_resident_{f16}")), "<=", 1.15, 21),
        (f"serve_b{batch}_over_b1_aggregate_float16",
         ratio(agg(f"serve_resident_{f16}"), agg(f"serve_resident_{f16}", 1)), ">=", 12.0, 21),
        (f"llm_b{batch}_over_b1_aggregate_float16",
         ratio(agg(f"llm_resident_{f16}"), agg(f"llm_resident_{f16}", 1)), None, None, 21),
        ("llm_stream_float16_speed_over_bound", get(f"llm_stream_{f16}", "speed_over_bound"), ">=", 0.9, 21),
        ("int4_llm_b1_ms_per_token", ms(f"llm_resident_{i4}"), "<=", 4.0, 22),
        ("int4_serve_b1_ms_per_token", ms(f"serve_resident_{i4}"), "<=", 4.6, 22),
        ("int8_llm_b1_ms_per_token", ms(f"llm_resident_{i8}"), "<=", 5.5, 22),
        ("int8_serve_b1_ms_per_token", ms(f"serve_resident_{i8}"), None, None, 22),
        (f"int4_over_float16_b{batch}_aggregate_llm",
         ratio(agg(f"llm_resident_{i4}"), agg(f"llm_resident_{f16}")), ">=", 1.3, 22),
        (f"int4_over_float16_b{batch}_aggregate_serve",
         ratio(agg(f"serve_resident_{i4}"), agg(f"serve_resident_{f16}")), ">=", 1.3, 22),
        ("int4_over_float16_prefill", ratio(get(f"llm_resident_{i4}", "prefill", "first_token_s"),
                                            get(f"llm_resident_{f16}", "prefill", "first_token_s")), "<=", 1.5, 22),
    ]
    goals += [(f"llm_stream_{q}_s_per_token", get(f"llm_stream_{q}", "s_per_token"), "<=", STREAM_BEFORE_S[q], 22)
              for q in QTYPES]
    out = {}
    same = {q: rows[f"llm_resident_{q}"]["batch1"]["token_ids"] == rows[f"serve_resident_{q}"]["batch1"]["token_ids"]
            for q in QTYPES if "token_ids" in rows.get(f"llm_resident_{q}", {}).get("batch1", {})
            and "token_ids" in rows.get(f"serve_resident_{q}", {}).get("batch1", {})}
    if same:  # the same greedy tokens for the same prompt through `LLM` and `serve` (batch 1)
        out["same_tokens_llm_serve"] = same
    for name, value, op, target, issue in goals:
        if value is None:
            continue
        out[name] = {"value": value, "issue": issue}
        if op and goals_apply:
            out[name].update(goal=f"{op} {target:g}", met=value <= target if op == "<=" else value >= target)
    return out


def part_table(a, res):
    rows, b = res.get("rows", {}), a.batch
    lines = [f"| row | ms/token b1 | b{b} aggregate tok/s | b{b} / b1 | prefill {a.prefill_tokens} s "
             f"| s/token streamed | streamed GB/s | speed / bound |", "|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"
    for key, r in rows.items():
        if key == "ceiling" or "skipped" in r:
            continue
        b1, bb = r.get("batch1", {}), r.get(f"batch{b}", {})
        ratio = (bb["aggregate_tok_per_s"] / b1["aggregate_tok_per_s"]
                 if "aggregate_tok_per_s" in bb and b1.get("aggregate_tok_per_s") else None)
        lines.append(f"| {key}{' (error)' if 'error' in r else ''} | {f(b1.get('ms_per_token'), '.2f')} "
                     f"| {f(bb.get('aggregate_tok_per_s'), '.0f')} "
                     f"| {f(ratio, '.1f')} "
                     f"| {f(r.get('prefill', {}).get('first_token_s'), '.3f')} | {f(r.get('s_per_token'), '.3f')} "
                     f"| {f(r.get('streamed_GBps'), '.2f')} | {f(r.get('speed_over_bound'), '.2f')} |")
    c = rows.get("ceiling", {})
    run = res.get("run", {})
    lines = [f"{run.get('utc', '?')} UTC, {run.get('gpu') or run.get('device', '?')}, torch {run.get('torch', '?')}, "
             f"{run.get('shape', '?')} shape{' (--quick: a CPU smoke test, no goal applies)' if a.quick else ''}",
             ""] + lines
    lines += ["", f"ceiling: {f(c.get('bytes_per_s', 0) / 1e9, '.2f')} GB/s ({c.get('reader', '-')})", "",
              "| goal | value | target | met |", "|---|---|---|---|"]
    for name, g in res.get("summary", {}).items():
        if name == "same_tokens_llm_serve":
            continue
        lines.append(f"| {name} (issue {g['issue']}) | {g['value']:.3f} | {g.get('goal', '-')} "
                     f"| {({True: 'yes', False: 'NO'}).get(g.get('met'), '-')} |")
    skipped = [f"{k}: {r['skipped']}" for k, r in rows.items() if "skipped" in r]
    errors = [f"{k}: {r['error']}" for k, r in rows.items() if "error" in r]
    errors += [f"{k} {m}: {v['error']}" for k, r in rows.items() for m, v in r.items()
               if isinstance(v, dict) and "error" in v]
    same = res.get("summary", {}).get("same_tokens_llm_serve", {})
    lines += [""] + [f"same greedy tokens, LLM and serve, batch 1, {q}: {'yes' if v else 'NO'}" for q, v in same.items()]
    lines += [f"skipped {s}" for s in skipped] + [f"error {e}" for e in errors]
    text = "\n".join(lines)
    print(text, flush=True)
    (a.work / "table-loop.md").write_text(text + "\n")
    if a.out:
        (a.out.parent / "table-loop.md").write_text(text + "\n")


# ---- the rows (each in its own process) -----------------------------------------------------------

class Partial:
    """A row's results so far, rewritten to its file after every measurement."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        print(f"  {key}", json.dumps(brief(value)), flush=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)  # whole, even if the row is killed now

    def attempt(self, key: str, fn) -> None:
        """put(key, fn()); an exception is kept as the key's error and the row goes on."""
        try:
            value = fn()
        except Exception as e:
            value = {"error": f"{type(e).__name__}: {e}"[:400]}
        self.put(key, value)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def open_llm(a, budget):
    """`LLM(model, device, vram_budget, max_batch)`; max_batch only where this `LLM` takes it."""
    from gdsllm import LLM
    kw = {"device": a.device, "vram_budget": budget}
    if "max_batch" in inspect.signature(LLM).parameters:
        kw["max_batch"] = a.max_batch
    t, llm = timed(a.device, lambda: LLM(str(a.model), **kw))
    return llm, {"load_s": t, "max_batch_passed": "max_batch" in kw}


def greedy(n: int):
    from gdsllm import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def llm_decode(a, llm, batch: int) -> dict:
    """ms/token of one sequence's decode and the batch's aggregate decode tokens/s."""
    prompts = [PROMPT] if batch == 1 else [f"{PROMPT} {i}" for i in range(batch)]  # 1: the service's
    llm.generate(prompts, greedy(a.tokens))  # warm-up: graph capture, allocator, Triton
    one = min(timed(a.device, lambda: llm.generate(prompts, greedy(1)))[0] for _ in range(3))
    runs = [timed(a.device, lambda: llm.generate(prompts, greedy(a.tokens))) for _ in range(3)]
    full, outs = min(runs, key=lambda r: r[0])
    step = (full - one) / (a.tokens - 1)
    return {"batch": batch, "tokens": a.tokens, "ms_per_token": step * 1e3, "aggregate_tok_per_s": batch / step,
            "one_token_s": one, "n_tokens_s": full, "token_ids": list(outs[0].token_ids)}


def row_llm(a, p: Partial):
    llm, info = open_llm(a, None)
    p.put("load", info)
    p.put("weight_bytes", load_model_meta(a.model).total_bytes)
    p.attempt("batch1", lambda: llm_decode(a, llm, 1))
    p.attempt("prefill", lambda: llm_prefill(a, llm))  # before batch B: issue 22's crash was there
    p.attempt(f"batch{a.batch}", lambda: llm_decode(a, llm, a.batch))
    llm.close()


def llm_prefill(a, llm) -> dict:
    """The first token of a prompt of exactly --prefill-tokens token ids (best of 3)."""
    vocab = load_model_meta(a.model).params.vocab_size
    ids = [(7 + 7919 * i) % (vocab - 8) + 4 for i in range(a.prefill_tokens)]
    llm.generate([ids], greedy(1))  # warm-up: the kernels of this row count
    t = min(timed(a.device, lambda: llm.generate([ids], greedy(1)))[0] for _ in range(3))
    return {"prompt_tokens": len(ids), "first_token_s": t}


def row_serve(a, p: Partial):
    with Served(a.model, device=a.device, extra=["--max-batch", str(a.max_batch)], log=a.log,
                startup_s=300.0) as srv:
        h = srv.health
        p.put("start", {"io_path": getattr(h, "io_path", None),
                        "resident_units": len(getattr(h, "resident_units", ()))})
        p.attempt("batch1", lambda: serve_one(a, srv))
        p.attempt(f"batch{a.batch}", lambda: serve_batch(a, srv, a.batch))


def serve_one(a, srv) -> dict:
    """One request at a time: ms/token on the client's clock (and on the server's)."""
    srv.decode(PROMPT, 4)  # warm-up
    one = min((timed("cpu", lambda: srv.decode(PROMPT, 1)) for _ in range(3)), key=lambda r: r[0])
    full = min((timed("cpu", lambda: srv.decode(PROMPT, a.tokens)) for _ in range(3)), key=lambda r: r[0])
    step = (full[0] - one[0]) / (a.tokens - 1)
    server_step = (full[1].total_s - one[1].total_s) / (a.tokens - 1)
    return {"batch": 1, "tokens": a.tokens, "ms_per_token": step * 1e3, "aggregate_tok_per_s": 1 / step,
            "server_ms_per_token": server_step * 1e3, "token_ids": full[1].token_ids}


def serve_batch(a, srv, b: int) -> dict:
    """`b` clients at once: aggregate decode tokens/s from the wall time of n tokens less that of 1
    (each with the b prompts), and the plain tokens / wall time of the n-token round."""
    srv.concurrent(b, a.tokens, PROMPT)  # warm-up: this batch's graphs
    one_b = min(srv.concurrent(b, 1, PROMPT)[1] for _ in range(3))
    n, full_b = min((srv.concurrent(b, a.tokens, PROMPT) for _ in range(3)), key=lambda r: r[1])
    step_b = (full_b - one_b) / (a.tokens - 1)
    return {"batch": b, "tokens": a.tokens, "ms_per_step": step_b * 1e3, "aggregate_tok_per_s": b / step_b,
            "one_token_wall_s": one_b, "n_tokens_wall_s": full_b, "wall_aggregate_tok_per_s": n / full_b}


def row_ceiling(a, p: Partial):
    meta = load_model_meta(a.model)
    files = [meta.path(u) for u in meta.units]
    got, dropped, n = {}, False, 0
    for threads in (8, 32):
        dropped = drop(a)
        got[f"posix_{threads}_threads"], n = storage_ceiling(files, threads=threads)
    if a.device.startswith("cuda"):
        drop(a)
        got["kvikio_4_files_in_flight"] = kvikio_ceiling(meta)
    best = max(got, key=got.get)
    p.put("bytes_per_s", got[best])
    p.put("reader", best)
    p.put("all", got)
    p.put("bytes", n)
    p.put("cold", dropped)


def row_stream(a, p: Partial):
    llm, info = open_llm(a, a.budget)
    p.put("load", info)
    plan = getattr(llm, "plan", None)
    sb = getattr(plan, "streamed_bytes_per_pass", None)  # the plan as `LLM` exposes it today
    p.put("streamed_bytes_from", "LLM.plan" if sb is not None else "gdsllm info")
    sb = sb if sb is not None else info_streamed_bytes(a)
    dropped = drop(a)
    timed(a.device, lambda: llm.generate(PROMPT, greedy(1)))  # warm-up; the weights still come cold
    t1, _ = timed(a.device, lambda: llm.generate(PROMPT, greedy(1)))
    tn, out = timed(a.device, lambda: llm.generate(PROMPT, greedy(a.stream_tokens)))
    r = {"budget": a.budget, "cold": dropped, "tokens": a.stream_tokens, "first_token_s": t1,
         "s_per_token": (tn - t1) / (a.stream_tokens - 1), "streamed_bytes_per_pass": sb,
         "slots": getattr(plan, "num_slots", None), "io_path": getattr(llm, "io_path", None),
         "token_ids": list(out.token_ids)}
    if sb:
        r["streamed_GBps"] = sb / r["s_per_token"] / 1e9
        if a.ceiling:  # the same run's ceiling row
            r["bound_s_per_token"] = sb / a.ceiling
            r["speed_over_bound"] = r["bound_s_per_token"] / r["s_per_token"]
    for k, v in r.items():
        p.put(k, v)
    llm.close()


def info_streamed_bytes(a) -> int | None:
    """Bytes read per pass at --budget as `gdsllm info -m M --vram-budget B` prints the plan
    ("streamed  N units, X MiB read per pass"; 0 when it prints no such line), None if it fails."""
    r = subprocess.run([sys.executable, "-m", "gdsllm", "info", "-m", str(a.model), "--vram-budget", a.budget,
                        "--device", a.device], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    m = re.search(r"^streamed\s+\d+ units?, ([\d,.]+) MiB read per pass", r.stdout, re.M)
    return round(float(m.group(1).replace(",", "")) * 2**20) if m else 0


def drop(a) -> bool:
    return False if a.no_drop else drop_caches()


ROW_KINDS = {"llm": row_llm, "serve": row_serve, "ceiling": row_ceiling, "stream": row_stream}


def quick_budget(model: Path) -> str:
    """--quick: the tiny model's embed and head resident, its blocks streamed through 2 slots."""
    units = {u.name: u for u in load_model_meta(model).units}
    block = max(u.nbytes for u in units.values() if u.kind == "block")
    return str(units["embed"].nbytes + units["head"].nbytes + 2 * block + 8 * 4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="models and results (default /tmp/gdsllm-loop; "
                    "--quick: a temporary folder removed at the end; a given one is emptied first when the parts "
                    "include synth)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results JSON here, after every row")
    ap.add_argument("--parts", default=None, help="synth,quantize,rows,table (the default)")
    ap.add_argument("--rows", default=None, help="which rows (default all, in the order above)")
    ap.add_argument("--quick", action="store_true", help="CPU, a tiny model, few tokens: checks the script")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", default="2GiB", help="the streamed rows' --vram-budget")
    ap.add_argument("--tokens", type=int, default=64, help="resident rows: tokens decoded")
    ap.add_argument("--stream-tokens", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--deadline-s", type=float, default=0.0, help="no row starts after this many seconds "
                    "(0: none), and the one running then is stopped")
    ap.add_argument("--min-row-s", type=float, default=15.0, help="a row starts only with this much time left")
    ap.add_argument("--no-drop", action="store_true", help="never drop the page cache (--quick: the default)")
    ap.add_argument("--row", choices=sorted(ROW_KINDS), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--partial", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ceiling", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.t0 = time.monotonic()
    if a.quick:
        if a.work is None:  # a check of the script: its models and results go with it
            a.work = Path(tempfile.mkdtemp(prefix="gdsllm-loop-quick-"))
            atexit.register(shutil.rmtree, a.work, True)
        elif a.row is None and "synth" in (a.parts or "synth").split(","):  # fresh models each time
            shutil.rmtree(a.work, ignore_errors=True)
        a.shape, a.device, a.no_drop = "tiny", "cpu", True
        a.tokens, a.stream_tokens, a.prefill_tokens = min(a.tokens, 8), min(a.stream_tokens, 4), min(a.prefill_tokens, 128)
        a.deadline_s = a.deadline_s or 110.0
        a.min_row_s = min(a.min_row_s, 5.0)
    a.work = (a.work or Path("/tmp/gdsllm-loop")).resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    a.log = a.work / "bench-loop.log"
    if a.row:  # one row, in the process the orchestrator started for it
        ROW_KINDS[a.row](a, Partial(a.partial))
        return
    parts = {"synth": part_synth, "quantize": part_quantize, "rows": part_rows, "table": part_table}
    a.parts = a.parts or ",".join(parts)
    # The models' part has a file of its own: it may run in the background beside the rows
    prep = set(a.parts.split(",")) <= {"synth", "quantize"}
    rp = a.work / ("results-prep.json" if prep else "results-loop.json")
    run_parts(a, parts, rp)  # part_rows also saves after every row
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(rp.read_text())

if __name__ == "__main__":
    main()
