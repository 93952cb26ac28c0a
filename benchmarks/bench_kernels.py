"""The quantized-matmul kernel table of docs/BENCHMARKS.md: ms per matmul against the row count M
for the LLaMA-7B weight shapes, int4 / int8 (gdsllm.quant.kernels_cuda) against bf16 / fp16 cuBLAS.
For the lent GPU.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out /tmp/k.json             # the table
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --sweep --big --out /tmp/sweep.json  # choose
    python3 benchmarks/bench_kernels.py --report docs/bench-kernels-2026-12-03-h200.json    # tables

Timing: per call, the median over 7 replays of one CUDA graph of matmuls over distinct copies of
the weight (256 MiB in all, 4x the H200's L2), so every weight comes from HBM and no launch cost
is counted, as in a decode pass over a whole model captured in graphs. Weights are random, quantized in groups
of 128 (the 7B benchmark's group size). `--sweep` times every candidate tile configuration of the
Triton kernels, tinygemm and dequantize + cuBLAS per M and shape, and prints the configuration
table that minimises the summed time over the shapes per M (what kernels_cuda.CONFIGS holds).
`--report` prints, from a sweep's JSON, the summed table of kernels_cuda's docstring and the
per-shape markdown table of docs/BENCHMARKS.md with what kernels_cuda.linear runs at each M.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # [N, K]: q/o, gate/up, down of LLaMA-7B
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BIG_ROWS = (512, 1024, 2048)
COPIES_BYTES = 256 << 20  # distinct weights per timed graph: 4x the L2, as a decode pass


def bench(fns) -> float:
    """ms per call of the callables `fns` (each a matmul over its own copy of a weight), captured
    back to back in one CUDA graph and replayed: what a decode pass pays, without launch costs."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    return sorted(times)[len(times) // 2]


def copies(w) -> list:
    from gdsllm.quant.schemes import QuantWeight
    if isinstance(w, QuantWeight):
        size = w.data.numel() * w.data.element_size() + w.scales.numel() * 2
        n = max(2, -(-COPIES_BYTES // size))
        return [QuantWeight(w.qtype, w.shape, w.group_size, w.data.clone(), w.scales.clone())
                for _ in range(n)]
    return [w.clone() for _ in range(max(2, -(-COPIES_BYTES // (w.numel() * 2))))]


def weights(n: int, k: int, group: int = 128):
    from gdsllm.quant.rtn import quantize
    from gdsllm.quant.schemes import QuantWeight
    w = torch.randn(n, k, device="cuda") * 0.02
    out = {}
    for q in ("int4", "int8"):
        qt = quantize(w, q, group, refine=0)
        data, sc = qt.packed()
        out[q] = copies(QuantWeight(q, (n, k), group, data.cuda(), sc.cuda()))
    out["bfloat16"], out["float16"] = copies(w.to(torch.bfloat16)), copies(w.to(torch.float16))
    return out


def check(qw, x) -> float:
    """Relative error of kernels_cuda.linear against float32 math on the dequantized weight."""
    from gdsllm.quant import kernels_cuda
    ref = x.float() @ qw.dequantize(torch.float32).T
    return float((kernels_cuda.linear(qw, x).float() - ref).norm() / ref.norm())


def table(rows, shapes) -> dict:
    from gdsllm.quant import kernels_cuda
    res = {}
    for n, k in shapes:
        ws = weights(n, k)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            r = {"bfloat16": bench([lambda w=w: F.linear(xb, w) for w in ws["bfloat16"]]),
                 "float16": bench([lambda w=w: F.linear(x, w) for w in ws["float16"]])}
            for q in ("int4", "int8"):
                r[q] = bench([lambda w=w: kernels_cuda.linear(w, x) for w in ws[q]])
                r[q + "_err"] = check(ws[q][0], x)
            res[f"{n}x{k}/{m}"] = r
            print(f"{n}x{k} M={m}", json.dumps({a: round(b, 5) for a, b in r.items()}), flush=True)
    return res


def sweep(rows, shapes) -> dict:
    from gdsllm.quant import triton_gemm
    res = {}
    for n, k in shapes:
        ws = weights(n, k)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            r = {}
            for q in ("int4", "int8"):
                for c in triton_gemm.CANDIDATES:
                    if (c[0] > max(16, 2 * m) or (c[4] > 1 and m > 32) or (c[0] < 16 and m > 8)
                            or (m > 256 and c[0] < 128)):
                        continue
                    cfg = triton_gemm.Config(*c)
                    try:
                        r[f"{q}/{c}"] = bench([lambda w=w: triton_gemm.matmul(x, w, cfg)
                                               for w in ws[q]])
                    except Exception as e:  # a tile that does not fit: say so, keep going
                        print(f"{q} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                buf = torch.empty(n * k, dtype=x.dtype, device="cuda")
                r[f"{q}/dequant+cublas"] = bench(
                    [lambda w=w: F.linear(x, triton_gemm.dequantize_into(w, buf)) for w in ws[q]])
            xb = x.to(torch.bfloat16)
            r["int4/tinygemm"] = bench([lambda w=w: torch.ops.aten._weight_int4pack_mm(
                xb, w.data, 128, w.scales) for w in ws["int4"]])
            r["float16"] = bench([lambda w=w: F.linear(x, w) for w in ws["float16"]])
            r["bfloat16"] = bench([lambda w=w: F.linear(xb, w) for w in ws["bfloat16"]])
            res[f"{n}x{k}/{m}"] = r
            best = {q: min((v, a) for a, v in r.items() if a.startswith(q)) for q in ("int4", "int8")}
            print(f"{n}x{k} M={m} fp16 {r['float16']:.4f} tinygemm {r['int4/tinygemm']:.4f}",
                  {q: (round(v, 4), a) for q, (v, a) in best.items()}, flush=True)
    choose(res, rows, shapes)
    return res


def choose(res: dict, rows, shapes) -> None:
    """Per qtype and M, the candidate with the least summed time over the shapes."""
    for q in ("int4", "int8"):
        for m in rows:
            keys = set.intersection(*(set(a for a in res[f"{n}x{k}/{m}"] if a.startswith(q + "/"))
                                      for n, k in shapes))
            tot = {a: sum(res[f"{n}x{k}/{m}"][a] for n, k in shapes) for a in keys}
            a = min(tot, key=tot.get)
            print(f"choose {q} M={m}: {a} total {tot[a]:.4f} ms; float16 "
                  f"{sum(res[f'{n}x{k}/{m}']['float16'] for n, k in shapes):.4f}", flush=True)


def summed(res: dict, shapes, rows) -> None:
    """us per matmul summed over the shapes: fp16, tinygemm, best Triton tile, dequantize."""
    keys = lambda m: [f"{n}x{k}/{m}" for n, k in shapes]
    line = lambda name, f: print(f"    {name:8s}" + "".join(f"{f(m):6.0f}" for m in rows))
    print("    T       " + "".join(f"{m:6d}" for m in rows))
    line("fp16", lambda m: 1e3 * sum(res[c]["float16"] for c in keys(m)))
    line("tinygemm", lambda m: 1e3 * sum(res[c]["int4/tinygemm"] for c in keys(m)))
    for q in ("int4", "int8"):
        def best(m):
            common = set.intersection(*(set(a for a in res[c] if a.startswith(q + "/(")) for c in keys(m)))
            return 1e3 * min(sum(res[c][a] for c in keys(m)) for a in common)
        line(q + " Tr", best)
        line(q + " dq", lambda m: 1e3 * sum(res[c][q + "/dequant+cublas"] for c in keys(m)))


def routed(res: dict, shapes, rows) -> None:
    """Markdown: us per matmul of what kernels_cuda.linear runs (float16 activations)."""
    from gdsllm.quant import kernels_cuda as kc

    def pick(q: str, m: int, r: dict) -> tuple[float, str]:
        if q == "int4" and m <= kc.INT4PACK_MAX_ROWS:
            return r["int4/tinygemm"], "tinygemm"
        if m <= kc.KERNEL_MAX_ROWS[q]:
            c = kc.config(q, m)
            return r[f"{q}/{(c.block_m, c.block_n, c.warps, c.stages, c.split_k)}"], "Triton"
        return r[f"{q}/dequant+cublas"], "dequant+cuBLAS"
    print("| N x K | M | bfloat16 | float16 | int4 | int4 kernel | int8 | int8 kernel |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    for n, k in shapes:
        for m in rows:
            r = res[f"{n}x{k}/{m}"]
            (t4, k4), (t8, k8) = pick("int4", m, r), pick("int8", m, r)
            print(f"| {n}x{k} | {m} | {1e3 * r['bfloat16']:.1f} | {1e3 * r['float16']:.1f} | "
                  f"{1e3 * t4:.1f} | {k4} | {1e3 * t8:.1f} | {k8} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, help="print the tables of a --sweep JSON")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--big", action="store_true", help=f"also M in {BIG_ROWS}")
    a = ap.parse_args()
    if a.report:
        res = json.loads(a.report.read_text())
        print(res["device"], "torch", res["torch"])
        rows = tuple(sorted({int(c.split("/")[1]) for c in res["results"]}))
        summed(res["results"], SHAPES, rows)
        routed(res["results"], SHAPES, rows)
        return
    if a.out is None or not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU and --out (or --report)")
    rows = ROWS + (BIG_ROWS if a.big else ())
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["results"] = (sweep if a.sweep else table)(rows, SHAPES)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
