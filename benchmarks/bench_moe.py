"""The mixture-of-experts benchmark of docs/BENCHMARKS.md (issue 12): a MoE shape at a budget far
below its size, batch 1 and batch 8, through a real `gdsllm serve`.

Run on a GPU machine as root (it drops the page cache), from the repository root:

    PYTHONPATH=. python3 benchmarks/bench_moe.py --work /tmp/moe --shape mixtral-8x7b --budget 12GiB
    PYTHONPATH=. python3 benchmarks/bench_moe.py --work /tmp/moe --shape tiny-moe --device cpu \\
        --budget 600KiB --tokens 8        # a smoke run anywhere

Parts (--parts, default all): synth (the shape, int4, unit by unit; made once), ceiling (raw
parallel O_DIRECT read of the model's files, cold), run (for each batch size: decode, with and
without expert prefetch). Reported per run (WORK/moe_results.json): bytes read per generated token
and per pass against streaming whole layers (every non-resident unit, all experts, every pass),
s/pass against bytes per pass / the same-run ceiling (the ratio the issue wants within 1.2x),
expert cache hit rate, prefetch hit rate, experts read on demand and on a guess.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gdsllm.format.metadata import load_model_meta
from gdsllm.service.benchmark import Served, drop_caches, storage_ceiling

PROMPT = "The storage hierarchy of a mixture of experts"
COUNTERS = ("gdsllm_storage_read_bytes_total", "gdsllm_expert_read_bytes_total",
            "gdsllm_expert_loads_total", "gdsllm_expert_cache_hits_total", "gdsllm_expert_routed_total",
            "gdsllm_expert_prefetch_hits_total", "gdsllm_expert_prefetch_misses_total",
            "gdsllm_generation_tokens_total")


def scrape(srv: Served) -> dict[str, float]:
    """The service's counters (summed over labels; expert loads also by reason)."""
    port = srv.cmd[srv.cmd.index("--metrics-port") + 1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(gdsllm_\w+?)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m and m.group(1) in COUNTERS:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            reason = re.search(r'reason="(\w+)"', m.group(2) or "")
            if reason:
                out[f"{m.group(1)}:{reason.group(1)}"] = float(m.group(3))
    return out


def part_synth(a, res):
    if (a.model / "metadata.json").exists():
        return
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gdsllm", "synth", str(a.model), "--shape", a.shape,
                    "--dtype", a.dtype, "--quant", a.quant, "--group-size", str(a.group_size)],
                   check=True)
    res["synth_s"] = time.perf_counter() - t0


def part_ceiling(a, res):
    meta = load_model_meta(a.model)
    drop_caches()
    bps, n = storage_ceiling([meta.path(u) for u in meta.units], threads=32)
    res["ceiling"] = {"bytes_per_s": bps, "bytes": n, "reader": "posix_32_threads"}
    print("ceiling", json.dumps(res["ceiling"]), flush=True)


def run_batch(a, meta, batch: int, prefetch: bool, ceiling: float) -> dict:
    extra = [] if prefetch else ["--no-expert-prefetch"]
    with Served(a.model, device=a.device, vram_budget=a.budget, prefetch_window=a.window,
                extra=extra + ["--max-batch", str(max(batch, 1))]) as srv:
        srv.decode(PROMPT, 2)  # warm: CUDA kernels, allocator
        drop_caches()
        srv.decode(PROMPT, 1)
        m0 = scrape(srv)
        clients = [srv.client.__class__(srv.endpoint, timeout=3600.0) for _ in range(batch)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(batch) as pool:
            outs = list(pool.map(lambda ic: ic[1].generate(
                prompt=f"{PROMPT} {ic[0]}", max_tokens=a.tokens, temperature=0.0, ignore_eos=True),
                enumerate(clients)))
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        m1 = scrape(srv)
        health = srv.health
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in set(m0) | set(m1)}
    tokens = d["gdsllm_generation_tokens_total"]
    passes = a.tokens  # one token per sequence per pass (batch sequences in each)
    resident = set(health.resident_units)
    whole = sum(u.nbytes for u in meta.units if u.name not in resident)  # whole layers, every pass
    read = d["gdsllm_storage_read_bytes_total"]
    decode_s = [(o.duration_s - o.time_to_first_token_s) / max(len(o.token_ids) - 1, 1) for o in outs]
    s_per_pass = sum(decode_s) / len(decode_s)
    ceiling_s = read / passes / ceiling if ceiling else float("nan")
    routed = d.get("gdsllm_expert_routed_total", 0.0)
    ph, pm = d.get("gdsllm_expert_prefetch_hits_total", 0.0), d.get("gdsllm_expert_prefetch_misses_total", 0.0)
    out = {"batch": batch, "prefetch": prefetch, "budget": a.budget, "tokens": tokens, "wall_s": wall,
           "s_per_pass": s_per_pass, "s_per_token": wall / tokens if tokens else None,
           "bytes_read": read, "bytes_per_token": read / tokens if tokens else None,
           "bytes_per_pass": read / passes, "whole_layers_bytes_per_pass": whole,
           "share_of_whole_layers": read / passes / whole if whole else None,
           "ceiling_s_per_pass": ceiling_s, "s_per_pass_over_ceiling": s_per_pass / ceiling_s if ceiling and read else None,
           "expert_bytes_read": d.get("gdsllm_expert_read_bytes_total", 0.0),
           "expert_loads_demand": d.get("gdsllm_expert_loads_total:demand", 0.0),
           "expert_loads_prefetch": d.get("gdsllm_expert_loads_total:prefetch", 0.0),
           "expert_routed": routed, "cache_hit_rate": d.get("gdsllm_expert_cache_hits_total", 0.0) / routed if routed else None,
           "prefetch_hit_rate": ph / (ph + pm) if ph + pm else None,
           "io_path": health.io_path, "resident_units": len(resident), "prompt_tokens": outs[0].prompt_tokens}
    print(json.dumps(out), flush=True)
    return out


def part_run(a, res):
    meta = load_model_meta(a.model)
    ceiling = res.get("ceiling", {}).get("bytes_per_s", 0.0)
    res["model_bytes"] = meta.total_bytes
    res["runs"] = [run_batch(a, meta, b, p, ceiling) for b in a.batches for p in (True, False)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--budget", default="12GiB", help="--vram-budget of every run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--window", type=int, default=2, help="--prefetch-window (dense streaming slots)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--parts", default="synth,ceiling,run")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.model = a.work / f"{a.shape}-{a.quant}"
    a.batches = [int(b) for b in a.batches.split(",")]
    out = a.work / "moe_results.json"
    res = json.loads(out.read_text()) if out.exists() else {}
    res.update(shape=a.shape, budget=a.budget, device=a.device, tokens=a.tokens)
    for part in a.parts.split(","):
        {"synth": part_synth, "ceiling": part_ceiling, "run": part_run}[part](a, res)
        out.write_text(json.dumps(res, indent=1))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
