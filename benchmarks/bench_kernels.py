"""The quantized-matmul kernel table of docs/BENCHMARKS.md: ms per matmul against the row count M
for the LLaMA-7B weight shapes, int4 / int8 (gdsllm.quant.kernels_cuda) against bf16 / fp16 cuBLAS.
For the lent GPU.

    PYTHONPATH=. python3 benchmarks/bench_kernels.py --out /tmp/k.json             # the table
    PYTHONPATH=. python3 benchmarks/bench_kernels.py --sweep --big --out /tmp/sweep.json  # choose
    python3 benchmarks/bench_kernels.py --report docs/bench-kernels-planes-2026-12-03-h200.json

Timing: per call, the median over 7 replays of one CUDA graph of matmuls over distinct copies of
the weight (256 MiB in all, 4x the H200's L2), so every weight comes from HBM and no launch cost
is counted, as in a decode pass over a whole model captured in graphs. Weights are random,
quantized in groups of 128 (the 7B benchmark's group size). `--sweep` checks (against float32 math)
and times every option per M and shape: the candidate tiles of the Triton kernels, tinygemm and
dequantize + cuBLAS, and prints per M the one with the least summed time over the shapes (what
kernels_cuda.CHOICES holds).
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
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)  # the decode buckets, then prefill chunks
BIG_ROWS = (512, 1024)
COPIES_BYTES = 256 << 20  # distinct weights per timed graph: 4x the L2, as a decode pass
# the activations each qtype's options are timed with in --sweep: what a model with those weights
# computes in on CUDA (gdsllm.engine.runner.compute_dtype: bfloat16 beside int4)
XDTYPE = {"int4": torch.bfloat16, "int8": torch.float16}


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
            for q in ("int4", "int8"):  # in the dtype a model of q computes in (XDTYPE)
                xq = xb if XDTYPE[q] == torch.bfloat16 else x
                r[q] = bench([lambda w=w: kernels_cuda.linear(w, xq) for w in ws[q]])
                r[q + "_err"] = check(ws[q][0], xq)
            res[f"{n}x{k}/{m}"] = r
            print(f"{n}x{k} M={m}", json.dumps({a: round(b, 5) for a, b in r.items()}), flush=True)
    return res


def options(q: str, m: int) -> list:
    """The sweep's options for qtype q at m rows: tile configurations (GEMV tiles up to 2 rows;
    tensor-core tiles of m/4 to under 2m rows, at least 16, split along K up to 64 rows; for int4
    those that permute x first or take it in plane order, for int8 the others), tinygemm
    (int4, up to 64 rows) and dequantize + cuBLAS."""
    out = []
    for c in triton_gemm().CANDIDATES:
        bm, split = c[0], c[4]
        planes = len(c) > 10 and c[10]  # int4 only: x in plane order
        if (planes and q != "int4") or (
                not planes and (len(c) > 7 and c[7]) != (q == "int4") and bm > 1):
            continue  # int4 tensor cores: x permuted (or in plane order)
        gemv = bm == 1 and m <= 2
        tc = (bm >= 16 and min(m, 128) // 4 <= bm and (bm == 16 or bm < 2 * m)
              and (split == 1 or m <= 64))
        if gemv or tc:
            out.append(c)
    return out + (["tinygemm"] if q == "int4" and m <= 64 else []) + ["dequant"]


def check_tiles(tiles, cases=((11008, 4096, 128), (4096, 11008, 32)), rows=(1, 5, 16, 33),
                repeats: int = 20) -> dict:
    """The tiles, in the activation dtype the sweep did not time (int4 float16, int8 bfloat16),
    in groups spanning a step and not, against float32 math; each split-K tile run `repeats`
    times more, bit for bit the same (partials are summed in a fixed order: a difference is a
    race)."""
    tg = triton_gemm()
    from gdsllm.quant.rtn import quantize
    from gdsllm.quant.schemes import QuantWeight
    other = {"int4": torch.float16, "int8": torch.bfloat16}
    out = {}
    for n, k, group in cases:
        w = torch.randn(n, k, device="cuda") * 0.02
        for q in ("int4", "int8"):
            data, sc = quantize(w, q, group, refine=0).packed()
            qw = QuantWeight(q, (n, k), group, data.to(w.device), sc.to(w.device))
            wf = qw.dequantize(torch.float32)
            for c in tiles[q]:
                if not tg.usable(q, k, tg.Config(*c), group, other[q]):
                    continue  # kernels_cuda.choice falls back there
                for m in rows:
                    x = torch.randn(m, k, device="cuda", dtype=other[q])
                    key = f"{q}/{n}x{k}/g{group}/{c}/{m}"
                    try:
                        y = tg.matmul(x, qw, tg.Config(*c))
                        ref = x.float() @ wf.T
                        err = float((y.float() - ref).norm() / ref.norm())
                        same = all(torch.equal(tg.matmul(x, qw, tg.Config(*c)), y)
                                   for _ in range(repeats if c[4] != 1 else 0))
                        out[key] = {"err": err, "repeatable": same}
                        if not (err < 2e-2 and same):
                            print("WRONG", key, err, same, flush=True)
                    except Exception as e:
                        out[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                        print("FAIL", key, out[key]["error"], flush=True)
    bad = [a for a, v in out.items() if not (v.get("err", 1) < 2e-2 and v.get("repeatable"))]
    print(f"check_tiles: {len(out)} runs, {len(bad)} wrong", flush=True)
    return out


def triton_gemm():
    from gdsllm.quant import triton_gemm as tg
    return tg


def run_option(q: str, opt, x, w, buf):
    """One matmul of option `opt` (a tile, "tinygemm", "dequant"): what kernels_cuda would run."""
    tg = triton_gemm()
    if opt == "tinygemm":
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), w.data, w.group_size,
                                                  w.scales).to(x.dtype)
    if opt == "dequant":
        return F.linear(tg.permute_x(x, w), tg.dequantize_into(w, buf, planes=True))
    return tg.matmul(x, w, tg.Config(*opt))


def sweep(rows, shapes, save=lambda res: None) -> dict:
    """Every option per qtype, M and shape: checked against float32 math on the dequantized
    weight (relative error in "<q>/<opt>/err"), then timed."""
    res = {}
    per_shape = {}
    for n, k in shapes:
        ws = weights(n, k)
        per_shape[n, k] = (ws, {q: ws[q][0].dequantize(torch.float32) for q in ("int4", "int8")})
    numel = max(n * k for n, k in shapes)
    bufs = {q: torch.empty(numel, dtype=XDTYPE[q], device="cuda") for q in XDTYPE}
    for m in rows:  # every shape per M, saved per M: a run out of time loses only the largest M
        for n, k in shapes:
            ws, wf = per_shape[n, k]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            r = {"float16": bench([lambda w=w: F.linear(x, w) for w in ws["float16"]]),
                 "bfloat16": bench([lambda w=w: F.linear(xb, w) for w in ws["bfloat16"]])}
            for q in ("int4", "int8"):
                xq = xb if XDTYPE[q] == torch.bfloat16 else x
                ref = xq.float() @ wf[q].T
                qbuf = bufs[q][:n * k]
                for opt in options(q, m):
                    key = f"{q}/{opt}"
                    try:
                        y = run_option(q, opt, xq, ws[q][0], qbuf)
                        r[key + "/err"] = float((y.float() - ref).norm() / ref.norm())
                        r[key] = bench([lambda w=w, o=opt: run_option(q, o, xq, w, qbuf)
                                        for w in ws[q]])
                    except Exception as e:  # a tile that does not fit: say so, keep going
                        print(f"{n}x{k} M={m} {key}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            res[f"{n}x{k}/{m}"] = r
            best = {q: min((v, a) for a, v in r.items() if a.startswith(q) and not a.endswith("err"))
                    for q in ("int4", "int8")}
            bad = [a for a, v in r.items() if a.endswith("/err") and not v < 2e-2]
            print(f"{n}x{k} M={m} fp16 {r['float16'] * 1e3:.1f} us",
                  {q: (round(v * 1e3, 1), a) for q, (v, a) in best.items()},
                  f"WRONG: {bad}" if bad else "", flush=True)
        save(res)
    return res


def choose(res: dict, shapes) -> dict:
    """Per qtype and M, the option with the least summed time over the shapes (err < 2e-2)."""
    rows = sorted({int(c.split("/")[1]) for c in res})
    out = {}
    for q in ("int4", "int8"):
        out[q] = []
        for m in rows:
            cells = [res[f"{n}x{k}/{m}"] for n, k in shapes]
            keys = set.intersection(*(set(a for a in c if a.startswith(q + "/") and not a.endswith("/err")
                                          and c.get(a + "/err", 1) < 2e-2) for c in cells))
            tot = {a: sum(c[a] for c in cells) for a in keys}
            a = min(tot, key=tot.get)
            fp16 = sum(c["float16"] for c in cells)
            out[q].append((m, a[len(q) + 1:], round(tot[a] * 1e3, 1), round(fp16 * 1e3, 1)))
            print(f"choose {q} M={m}: {a} {tot[a] * 1e3:.1f} us summed; float16 {fp16 * 1e3:.1f}",
                  flush=True)
    return out


def summed(res: dict, shapes) -> None:
    """us per matmul summed over the shapes: bf16, fp16, and per qtype the chosen option."""
    rows = sorted({int(c.split("/")[1]) for c in res})
    ch = choose(res, shapes)
    print("    M           " + "".join(f"{m:6d}" for m in rows))
    for d in ("bfloat16", "float16"):
        print(f"    {d:12s}" + "".join(f"{1e3 * sum(res[f'{n}x{k}/{m}'][d] for n, k in shapes):6.0f}"
                                   for m in rows))
    for q in ("int4", "int8"):
        print(f"    {q:12s}" + "".join(f"{t:6.0f}" for _, _, t, _ in ch[q]))
        print(f"    {q + ' dq':12s}" + "".join(
            f"{1e3 * sum(res[f'{n}x{k}/{m}'][q + '/dequant'] for n, k in shapes):6.0f}" for m in rows))


def routed(res: dict, shapes) -> None:
    """Markdown: us per matmul of what kernels_cuda.linear runs (float16 activations)."""
    from gdsllm.quant import kernels_cuda as kc
    rows = sorted({int(c.split("/")[1]) for c in res})

    def pick(q: str, m: int, k: int, r: dict) -> tuple[float, str]:
        c = kc.choice(q, m, k, torch.float16)
        if isinstance(c, str):
            return r[f"{q}/{c}"], c
        t = next(t for t in triton_gemm().CANDIDATES if triton_gemm().Config(*t) == c)
        return r.get(f"{q}/{t}", float("nan")), f"Triton {t}"  # nan: not timed at this M
    print("| N x K | M | bfloat16 | float16 | int4 | int4 kernel | int8 | int8 kernel |")
    print("|---|---:|---:|---:|---:|---|---:|---|")
    for n, k in shapes:
        for m in rows:
            r = res[f"{n}x{k}/{m}"]
            (t4, k4), (t8, k8) = pick("int4", m, k, r), pick("int8", m, k, r)
            print(f"| {n}x{k} | {m} | {1e3 * r['bfloat16']:.1f} | {1e3 * r['float16']:.1f} | "
                  f"{1e3 * t4:.1f} | {k4} | {1e3 * t8:.1f} | {k8} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, help="print the tables of a --sweep JSON")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--big", action="store_true", help=f"also M in {BIG_ROWS}")
    ap.add_argument("--check", type=Path, help="only check the tiles a --sweep JSON chose "
                    "(the other activation dtype, groups of 128 and 32, split-K repeatable)")
    ap.add_argument("--rows", help="comma-separated M to measure instead of the default")
    a = ap.parse_args()
    if a.report:
        res = json.loads(a.report.read_text())
        print(res["device"], "torch", res["torch"])
        summed(res["results"], SHAPES)
        routed(res["results"], SHAPES)
        return
    if a.out is None or not torch.cuda.is_available():
        sys.exit("bench_kernels: needs a CUDA GPU and --out (or --report)")
    rows = ROWS + (BIG_ROWS if a.big else ())
    if a.rows:
        rows = tuple(int(r) for r in a.rows.split(","))
    import triton
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__}
    if a.check:
        import ast
        from gdsllm.quant import kernels_cuda
        chosen = json.loads(a.check.read_text())["choices"]  # and what CHOICES holds now
        tiles = {q: sorted({ast.literal_eval(o) for _, o, _, _ in rows if o.startswith("(")}
                           | {c for _, c in kernels_cuda.CHOICES[q] if isinstance(c, tuple)})
                 for q, rows in chosen.items()}
        res["check"] = check_tiles(tiles)
        a.out.write_text(json.dumps(res, indent=1))
        return
    if a.sweep:
        res["results"] = sweep(rows, SHAPES, lambda r: a.out.write_text(json.dumps(
            dict(res, results=r), indent=1)))
    else:
        res["results"] = table(rows, SHAPES)
    if a.sweep:
        res["choices"] = choose(res["results"], SHAPES)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
