"""Does reading weights from the service's arena cost more than from a local allocation?

    python3 benchmarks/bench_arena.py --gib 8 --out arena.json      # CUDA only

`gdsllm serve` decodes the 7B float16 model 1.68x slower per token than `LLM` (H200, 2026-12-03,
docs/BENCHMARKS.md "One engine loop on the GPU"), and the gap grows with the bytes of the
weights. The two run the same Runner and the same CUDA graphs; what differs is where the weights
live: `LLM` reads its own `torch.empty` allocation, the compute worker reads the I/O worker's
arena (one `cupy.cuda.runtime.malloc`) opened over CUDA IPC (ipc.arena). This times one chain of
matrix-vector products (batch 1 and 16, float16, the 7B's 4096x11008 / 11008x4096 shapes, replayed
as one CUDA graph) over the same bytes placed four ways, each in the same run:

- `torch`: a torch.empty allocation of this process;
- `arena_owner`: ipc.arena.Arena.create("cuda") of this process (the I/O worker's view);
- `arena_ipc`: the same arena opened in a second process over CUDA IPC (the compute worker's
  view), the owner alive and idle;
- `torch_beside_idle_context`: a torch allocation while another process holds an idle CUDA
  context with the arena (the service's three processes share the GPU).

It reports GB/s of weights read per replay (best of --repeats).

Not yet run: written on 2026-12-03 when the session's device time was spent, so no figure comes
from it yet. If `arena_ipc` reads slower than `torch`, the fix is for the compute worker to own
the allocation and the I/O worker to open it (its writes run at the disk's speed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

H, F = 4096, 11008
PAIR = 2 * H * F * 2  # bytes of one up (H->F) and one down (F->H) float16 matrix


def chain_time(buf: torch.Tensor, rows: int, repeats: int) -> dict:
    """Seconds per replay of x -> x @ up -> @ down over every matrix pair in `buf` (uint8)."""
    n = buf.numel() // PAIR
    w = buf[: n * PAIR].view(torch.float16).view(n, 2, H * F)
    ups = [w[i, 0].view(H, F) for i in range(n)]
    downs = [w[i, 1].view(F, H) for i in range(n)]
    x0 = torch.randn(rows, H, device=buf.device, dtype=torch.float16) * 1e-2
    out = torch.empty_like(x0)

    def body():
        x = x0
        for u, d in zip(ups, downs):
            x = (x @ u).clamp_(-1, 1) @ d
        out.copy_(x)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # warm-up: cuBLAS picks its kernels
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    best = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best.append(a.elapsed_time(b) / 1e3)
    t = min(best)
    return {"rows": rows, "pairs": n, "bytes": n * PAIR, "s": t, "GBps": n * PAIR / t / 1e9,
            "median_s": sorted(best)[len(best) // 2]}


def fill(buf: torch.Tensor) -> None:
    """Random float16 values (a zero page reads no faster, but keep the data honest)."""
    g = torch.Generator(device=buf.device).manual_seed(0)
    step = 1 << 28
    for o in range(0, buf.numel() - 1, step):
        n = min(step, buf.numel() - o) // 2 * 2
        buf[o: o + n].view(torch.float16).copy_(
            torch.randn(n // 2, device=buf.device, dtype=torch.float16, generator=g) * 0.02)


def measure(buf: torch.Tensor, repeats: int) -> dict:
    return {f"batch{r}": chain_time(buf, r, repeats) for r in (1, 16)}


def attached(spec_fields, repeats: int, q) -> None:
    """In a second process: open the arena over CUDA IPC and time the chain over it."""
    from ipc.arena import Arena, ArenaSpec
    torch.cuda.init()
    with Arena.attach(ArenaSpec(*spec_fields)) as arena:
        q.put(measure(arena.tensor, repeats))


def idle_owner(nbytes: int, ready, stop) -> None:
    """In a second process: hold an arena (and so a CUDA context) and do nothing."""
    from ipc.arena import Arena
    with Arena.create("cuda", nbytes) as arena:
        ready.put(tuple(arena.spec.__dict__.values()))
        stop.get()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=8.0, help="weights read per replay")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from ipc.arena import Arena
    nbytes = int(a.gib * 2**30) // PAIR * PAIR
    ctx = mp.get_context("spawn")
    res = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "gpu": torch.cuda.get_device_name(),
           "torch_version": torch.__version__, "bytes": nbytes}

    local = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    fill(local)
    res["torch"] = measure(local, a.repeats)

    with Arena.create("cuda", nbytes) as arena:
        arena.tensor.copy_(local)
        torch.cuda.synchronize()
        res["arena_owner"] = measure(arena.tensor, a.repeats)
        q = ctx.Queue()
        p = ctx.Process(target=attached, args=(tuple(arena.spec.__dict__.values()), a.repeats, q))
        p.start()
        res["arena_ipc"] = q.get(timeout=600)
        p.join(60)

    ready, stop = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=idle_owner, args=(1 << 30, ready, stop))
    p.start()
    ready.get(timeout=120)
    res["torch_beside_idle_context"] = measure(local, a.repeats)
    stop.put(None)
    p.join(60)

    for k in ("torch", "arena_owner", "arena_ipc", "torch_beside_idle_context"):
        print(f"{k:28s}" + "".join(f"  b{r['rows']}: {r['s'] * 1e3:7.2f} ms {r['GBps']:7.0f} GB/s"
                                   for r in res[k].values()))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
