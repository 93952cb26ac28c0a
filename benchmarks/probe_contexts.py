"""Does a running `gdsllm serve` slow the GPU for everyone, or only for its compute worker?

    PYTHONPATH=. python3 benchmarks/probe_contexts.py -m MODEL --out $OUT/contexts.json   # CUDA only

The compute worker's matmuls ran about 2x longer than the same kernels in `LLM` (H200,
2026-12-03, benchmarks/profile_decode.py --serve: LLaMA-7B shape, 8 blocks, float16), while an
arena opened over CUDA IPC reads as fast as a local allocation (benchmarks/bench_arena.py). This
times `LLM` decode at batch 1 (ms/token, (64 tokens - 1) / 63, best of 3) in this process:
alone, beside an idle `gdsllm serve` of the same model, beside that service while a client
decodes through it, and alone again after it stopped; with `nvidia-smi` samples (utilization,
SM and memory clocks) in each phase, and the service's own ms/token. Then (--arena) `LLM` with its
weights buffer placed as the service places it: an ipc.arena.Arena of this process (cupy's
cudaMalloc), and one owned by a second process and opened here over CUDA IPC.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.profile_decode import PROMPT, decode_ms  # noqa: E402


def llm_ms(llm, tokens: int = 64) -> float:
    return decode_ms(llm, [PROMPT], tokens)


def smi(seconds: float) -> list[str]:
    q = "utilization.gpu,utilization.memory,clocks.sm,clocks.mem,power.draw"
    p = subprocess.Popen(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader", "-lms", "250"],
                         stdout=subprocess.PIPE, text=True)
    time.sleep(seconds)
    p.terminate()
    return [ln.strip() for ln in p.communicate()[0].splitlines() if ln.strip()]


def arena_owner(nbytes: int, ready, stop) -> None:
    """In a second process: create an arena, hand its spec over, hold it until told."""
    from ipc.arena import Arena
    with Arena.create("cuda", nbytes) as arena:
        ready.put(tuple(arena.spec.__dict__.values()))
        stop.get()


def llm_over(model: Path, arena_tensor) -> float:
    """LLM decode ms/token with its weights buffer (the first uint8 torch.empty it makes, of the
    plan's arena size) taken from `arena_tensor` instead; every other allocation is torch's."""
    from gdsllm import LLM
    real, taken = torch.empty, []

    def empty(*size, dtype=None, device=None, **kw):
        n = size[0] if len(size) == 1 and isinstance(size[0], int) else None
        if not taken and dtype is torch.uint8 and n is not None and n <= arena_tensor.numel():
            taken.append(n)
            return arena_tensor[:n]
        return real(*size, dtype=dtype, device=device, **kw)

    torch.empty = empty  # torch's own: LLM's module reads it as torch.empty
    try:
        llm = LLM(str(model), device="cuda", max_batch=4, kv_tokens=4096)
    finally:
        torch.empty = real
    try:
        return llm_ms(llm)
    finally:
        llm.close()


def arena_rows(model: Path, res: dict) -> None:
    import multiprocessing as mp
    from gdsllm.format.metadata import load_model_meta
    from ipc.arena import Arena, ArenaSpec
    nbytes = int(load_model_meta(model).total_bytes * 1.25) + (64 << 20)
    with Arena.create("cuda", nbytes) as own:
        res["llm_over_own_arena_ms"] = llm_over(model, own.tensor)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=arena_owner, args=(nbytes, ready, stop))
    p.start()
    try:
        with Arena.attach(ArenaSpec(*ready.get(timeout=120))) as ipc:
            res["llm_over_ipc_arena_ms"] = llm_over(model, ipc.tensor)
    finally:
        stop.put(None)
        p.join(60)
    llm = __import__("gdsllm").LLM(str(model), device="cuda", max_batch=4, kv_tokens=4096)
    res["llm_torch_empty_again_ms"] = llm_ms(llm)
    llm.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, required=True)
    ap.add_argument("--arena", action="store_true", help="only the arena rows")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.arena:
        res = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
        arena_rows(a.model, res)
        print(res)
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))
        return 0
    from gdsllm import LLM
    from gdsllm.service.benchmark import Served
    res = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "gpu": torch.cuda.get_device_name()}
    llm = LLM(str(a.model), device="cuda", max_batch=4, kv_tokens=4096)
    res["llm_alone_ms"] = llm_ms(llm)
    res["smi_llm_idle"] = smi(1.0)
    with Served(a.model, device="cuda", extra=["--max-batch", "4", "--kv-budget", "4GiB"], startup_s=300.0) as srv:
        srv.decode(PROMPT, 8)
        res["smi_serve_idle"] = smi(2.0)
        res["compute_apps"] = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
            capture_output=True, text=True).stdout.splitlines()
        res["llm_beside_idle_serve_ms"] = llm_ms(llm)
        one = min(srv.decode(PROMPT, 1).total_s for _ in range(3))
        full = min(srv.decode(PROMPT, 64).total_s for _ in range(3))
        res["serve_ms"] = (full - one) / 63 * 1e3
        busy = threading.Thread(target=lambda: [srv.decode(PROMPT, 200) for _ in range(4)])
        busy.start()
        time.sleep(0.5)
        res["smi_serve_decoding"] = smi(1.0)
        res["llm_beside_decoding_serve_ms"] = llm_ms(llm, 32)
        busy.join()
    res["llm_after_ms"] = llm_ms(llm)
    llm.close()
    for k, v in res.items():
        print(f"{k}: {v}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
