"""The GPU benchmark of docs/BENCHMARKS.md: GdsLLM against the disk and its peers, one table.

Run on a GPU machine as root (it drops the page cache), from the repository root:

    PYTHONPATH=. python3 benchmarks/bench_7b.py --work /tmp/gb --parts synth,ceiling,gdsllm
    PYTHONPATH=. python3 benchmarks/bench_7b.py --work /tmp/gb --parts peers,table

Parts: synth (a LLaMA-7B-shaped float16 model and its Hugging Face copy, made once), ceiling (raw
parallel O_DIRECT read, cold), gdsllm (decode at the budget cold/direct, buffered warm, all
resident; TTFT of a 512-token prompt; 8 concurrent requests), peers (AirLLM cold and warm,
transformers with the whole model resident), table. Results accumulate in WORK/results.json, so the
parts can run in separate calls on the same machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gdsllm.service.benchmark import Served, cached_bytes, drop_caches, meminfo_cached, storage_ceiling
from gdsllm.format.metadata import load_model_meta

GB = 1e9


def sh(cmd: list[str], log: Path) -> str:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0:3]} exited {p.returncode}; see {log}")
    return p.stdout


def part_synth(a, res):
    if (a.model / "metadata.json").exists():
        return
    t0 = time.perf_counter()
    sh([sys.executable, "-m", "gdsllm", "synth", str(a.model), "--shape", a.shape, "--dtype",
        "float16", "--hf-out", str(a.hf)], a.log)
    res["synth_s"] = time.perf_counter() - t0


def part_ceiling(a, res):
    """The best of several raw readers, each cold: O_DIRECT preadv from 8 and 32 threads into host
    memory, and (on a GPU) KvikIO straight into device memory, 4 files in flight."""
    meta = load_model_meta(a.model)
    files = [meta.path(u) for u in meta.units]
    got = {}
    for threads in (8, 32):
        drop_caches()
        got[f"posix_{threads}_threads"], n = storage_ceiling(files, threads=threads)
    if a.device == "cuda":
        drop_caches()
        got["kvikio_4_files_in_flight"] = kvikio_ceiling(meta)
    best = max(got, key=got.get)
    res["ceiling"] = {"bytes_per_s": got[best], "bytes": n, "reader": best, "all": got}
    dd = subprocess.run(["dd", f"if={files[1]}", "of=/dev/null", "bs=16M", "iflag=direct"],
                        capture_output=True, text=True).stderr.strip().splitlines()
    res["dd_one_unit"] = dd[-1] if dd else ""
    print("ceiling", json.dumps(res["ceiling"]), flush=True)


def kvikio_ceiling(meta) -> float:
    import torch

    from gdsllm.format.storage import CudaReader
    size = max(u.nbytes for u in meta.units)
    bufs = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(4)]
    reader = CudaReader(direct=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(lambda i: sum(reader.read(meta.path(u), bufs[i], u.nbytes)
                                           for u in meta.units[i::4]), range(4)))
    torch.cuda.synchronize()
    return total / (time.perf_counter() - t0)


def streamed_bytes(meta, health) -> int:
    resident = set(health.resident_units)
    return sum(u.nbytes for u in meta.units if u.name not in resident)


def decode_run(a, meta, key, res, *, budget, io="direct", cold=True, warm_first=False, n=None,
               prompt="The storage hierarchy of a language model"):
    n = n or a.tokens
    with Served(a.model, device=a.device, vram_budget=budget, prefetch_window=a.window, io=io,
                log=a.log) as srv:
        if warm_first:
            srv.decode(prompt, 2)
        if cold:
            # Drop the page cache, then one token: it pages the Python and CUDA libraries back in
            # (they count in `Cached` too). Direct reads never cache the weights, so every pass
            # after it still reads them cold from the disk; `model_bytes_in_page_cache` checks.
            drop_caches()
            srv.decode(prompt, 1)
        c0 = meminfo_cached()
        r = srv.decode(prompt, n)
        c1 = meminfo_cached()
        model_cached = sum(cached_bytes(meta.path(u)) for u in meta.units)
        sb = streamed_bytes(meta, srv.health)
        res[key] = {"budget": budget, "io": io, "cold": cold, "tokens": r.tokens,
                    "prompt_tokens": r.prompt_tokens, "ttft_s": r.ttft_s, "total_s": r.total_s,
                    "s_per_token": r.decode_s_per_token, "streamed_bytes_per_pass": sb,
                    "streamed_GBps": sb / r.decode_s_per_token / GB if sb else 0.0,
                    "cache_growth_bytes": c1 - c0, "model_bytes_in_page_cache": model_cached,
                    "peak_rss": srv.peak_rss(),
                    "io_path": srv.health.io_path, "resident_units": len(srv.health.resident_units),
                    "token_ids": r.token_ids}
        print(key, json.dumps({k: v for k, v in res[key].items() if k != "token_ids"}), flush=True)
        return srv, r


def part_gdsllm(a, res):
    meta = load_model_meta(a.model)
    decode_run(a, meta, "gdsllm_direct_cold", res, budget=a.budget)
    decode_run(a, meta, "gdsllm_buffered_warm", res, budget=a.budget, io="buffered", cold=False,
               warm_first=True)
    decode_run(a, meta, "gdsllm_resident", res, budget=None, cold=False, warm_first=True,
               n=max(a.tokens, 32))
    # Time to first token of a 512-token prompt, and eight requests at once, at the budget.
    with Served(a.model, device=a.device, vram_budget=a.budget, prefetch_window=a.window,
                log=a.log) as srv:
        from gdsllm.engine.tokenizer import Tokenizer
        tok = Tokenizer(meta)
        ids = tok.encode(" ".join(f"word{i}" for i in range(2000)))[:512]
        long_prompt = tok.decode(ids)
        r = srv.decode(long_prompt, 2)
        res["ttft_512"] = {"prompt_tokens": r.prompt_tokens, "ttft_s": r.ttft_s}
        one = srv.decode("Alone in the pass", a.tokens)
        n, dt = srv.concurrent(8, a.tokens)
        agg = n / dt
        res["concurrent8"] = {"aggregate_tok_per_s": agg, "single_tok_per_s": one.tokens / one.total_s,
                              "ratio": agg / (one.tokens / one.total_s)}
        print("concurrent8", json.dumps(res["concurrent8"]), flush=True)


def peer(a, name, tokens):
    out = sh([sys.executable, str(Path(__file__).with_name("peers.py")), name, str(a.hf),
              "--tokens", str(tokens)], a.log)
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def part_peers(a, res):
    c0 = meminfo_cached()
    # AirLLM's first run splits the model into per-layer files: not timed as cold.
    res["airllm_prepare"] = peer(a, "airllm", 1)
    res["airllm_prepare"]["cache_growth_bytes"] = meminfo_cached() - c0
    drop_caches()
    c1 = meminfo_cached()
    res["airllm_cold"] = peer(a, "airllm", a.peer_tokens)
    res["airllm_cold"]["cache_growth_bytes"] = meminfo_cached() - c1
    res["airllm_warm"] = peer(a, "airllm", a.peer_tokens)
    res["transformers"] = peer(a, "transformers", max(a.tokens, 32))


def part_table(a, res):
    from benchmarks.table import render
    text = render(res)
    print(text)
    (a.work / "table.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gdsllm-bench"))
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--peer-tokens", type=int, default=4, help="AirLLM's tokens (it is slow)")
    ap.add_argument("--parts", default="synth,ceiling,gdsllm,peers,table")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.model, a.hf, a.log = a.work / "model", a.work / "model-hf", a.work / "bench.log"
    run_parts(a, {name[5:]: f for name, f in globals().items() if name.startswith("part_")},
              a.work / "results.json")


def run_parts(a, parts: dict, rp: Path) -> None:
    """Run the parts named in a.parts in order, results accumulating in the JSON file `rp`."""
    res = json.loads(rp.read_text()) if rp.exists() else {}
    for part in a.parts.split(","):
        print(f"== {part}", flush=True)
        t0 = time.perf_counter()
        try:
            parts[part](a, res)
        except Exception as e:  # one failed part must not lose the others' numbers
            res.setdefault("errors", {})[part] = f"{type(e).__name__}: {e}"
            print(f"part {part} failed: {e}", flush=True)
        res.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        rp.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
