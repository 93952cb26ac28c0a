"""Probe (issue 22): why the whole-tile Triton W4A16 GEMM read int4 at ~0.8 TB/s at 16 rows, and
the tile that replaced it (now gdsllm.quant.triton_gemm's `Config.planes`). For the lent GPU.

    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py time --rows 1,8,16,32,64,512 --out /tmp/w4.json
    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py ncu   # under ncu --profile-from-start off:
        # one launch each of the tile kernels_cuda runs at 16 rows, the planes tile, tinygemm and
        # cuBLAS bfloat16 at 11008 x 4096
    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py grouped --rows 16,8,32 --out /tmp/g.json
        # the planes tile's launch shapes over an int4 block's launches at 5-32 rows (BLOCK),
        # then the int8 tiles at --int8-rows (1,16)

`time`: us per matmul over the LLaMA-7B shapes (bench_kernels' graphs over 256 MiB of weight
copies, every weight from HBM): bfloat16 cuBLAS, what kernels_cuda runs, tinygemm, and
triton_gemm's planes tile over a grid of launch shapes (an x per weight copy, so each matmul puts
its x in plane order), each checked against float32 math; the planes tile with one x for all
copies (one permutation) and the permutation alone; at 512 rows the dequantization step alone by
rows per program. Then the Triton IR op counts of every kernel compiled (TRITON_CACHE_DIR set:
layout conversions, shared-memory buffers). Raw results of 2026-12-04 on the H200 (a version of
this probe that carried its own copy of the planes kernel, the same code as triton_gemm's
`_w4_planes` now, and permuted x on every call): docs/probe-w4-tiles-2026-12-04-h200.json; the
ncu sections of the whole tile and the planes tile: docs/ncu-w4-tiles-2026-12-04-h200.txt; a
first version timed a tile that loads each word once per nibble
(docs/probe-w4-gather-2026-12-04-h200.json, its "gather" rows; that kernel is not kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, bench, weights  # noqa: E402

from gdsllm.quant import kernels_cuda, triton_gemm as tg  # noqa: E402


def planes(x, w, bm=16, bn=64, split=8, warps=4, stages=4, swap=True, asm=False):
    """x @ W.T through gdsllm.quant.triton_gemm's planes tile at this launch shape (split 0:
    `auto_split`). x is put in plane order unless it is the x of the previous call (planes_x)."""
    return tg.matmul(x, w, tg.Config(bm, bn, warps, stages, split, 128, swap, False, True, asm,
                                     True))


PLANES = [dict(bm=16, bn=bn, split=s, warps=wp, stages=st, asm=asm)
          for bn, s, wp, st, asm in ((128, 4, 4, 3, False), (128, 4, 4, 3, True),
                                     (64, 8, 4, 4, True), (128, 4, 8, 3, True),
                                     (64, 4, 4, 4, True), (128, 2, 4, 4, True),
                                     (128, 8, 4, 3, True), (64, 8, 4, 3, False),
                                     (32, 16, 4, 3, True))]
DEQUANT_BN = (16, 32, 64, 128)


# The launches of an int4 LLaMA-7B block at 5-32 rows (kernels_cuda.linears): q+k+v and
# gate+up as one launch each (weights of one K side by side), o and down alone; [N, K] per weight
BLOCK = {"qkv": ((4096, 4096),) * 3, "o": ((4096, 4096),), "gate_up": ((11008, 4096),) * 2,
         "down": ((4096, 11008),)}


def grouped_configs() -> list[tuple]:
    """Planes tiles (Config fields) for `grouped`: launch shapes by swap, rows per program,
    pipeline stages and split. (The run of 2026-12-05 03:52 UTC, docs/BENCHMARKS.md, also timed
    a variant loading the next step's x before this step's products, branch issue22-xpre: 25-50%
    slower, not kept.)"""
    out = [(16, bn, 4, st, sp, 128, True, False, True, True, True)
           for bn in (64, 128) for st in (3, 4) for sp in (0, 4, 8)]
    out += [(16, bn, 4, 3, sp, 128, False, False, True, True, True) for bn in (64, 128) for sp in (0, 4)]
    return out + [(16, 128, 8, 3, 0, 128, True, False, True, True, True)]


def int8_configs() -> list[tuple]:
    """int8 tiles (Config fields) for `grouped`: the chosen 16-row tile by split, rows per
    program and stages."""
    return [(16, bn, 4, st, sp, 128, True) for bn, st, sp in (
        (64, 4, 8), (64, 4, 4), (64, 4, 16), (32, 4, 8), (128, 4, 8), (64, 3, 8))]


def time_tiles(name: str, qtype: str, shapes, rows, cfgs, dtype, res: dict, out) -> None:
    """`grouped`'s timing of tiles `cfgs` (Config fields) over the weights `shapes` of one x
    (one launch) at each row count; the best 4 at the first row count at the others too."""
    from gdsllm.quant.rtn import quantize
    from gdsllm.quant.schemes import QuantWeight
    k = shapes[0][1]
    parts = []
    for n, _ in shapes:
        w = torch.randn(n, k, device="cuda") * 0.02
        data, sc = quantize(w, qtype, 128, refine=0).packed()
        parts.append(QuantWeight(qtype, (n, k), 128, data.cuda(), sc.cuda()))
    size = sum(p.data.numel() * p.data.element_size() + p.scales.numel() * 2 for p in parts)
    sets = [parts] + [[QuantWeight(p.qtype, p.shape, p.group_size, p.data.clone(), p.scales.clone())
                       for p in parts] for _ in range(max(1, (256 << 20) // size))]
    wb = torch.cat([p.dequantize(dtype) for p in parts])
    wbs = [wb.clone() for _ in range(max(2, (256 << 20) // (wb.numel() * 2)))]
    ref_w = torch.cat([p.dequantize(torch.float32) for p in parts])
    full = lambda c: list(dataclasses.astuple(tg.Config(*c)))  # noqa: E731 (every field)
    current = full(kernels_cuda.CHOICES[qtype][1 if qtype == "int4" else 0][1])
    order = [full(c) for c in cfgs]
    if current not in order:
        order.append(current)
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ ref_w.T
        r = {str(dtype).removeprefix("torch."): bench([lambda w=w: F.linear(x, w) for w in wbs])}
        for c in order:
            cfg = tg.Config(*c)
            key = json.dumps(c, separators=(",", ":"))
            try:
                y = tg.matmul(x, tuple(parts) if len(parts) > 1 else parts[0], cfg)
                err = float((y.float() - ref).norm() / ref.norm())
                if err > 2e-2:
                    r[key] = f"error {err:.3g}"
                    continue
                r[key] = bench([lambda s=s: tg.matmul(x, tuple(s) if len(s) > 1 else s[0], cfg)
                                for s in sets])
            except Exception as e:  # a launch shape Triton cannot compile
                r[key] = f"{type(e).__name__}: {str(e)[:160]}"
        res["rows"][f"{qtype}/{name}/{m}"] = r
        timed = sorted((v, kk) for kk, v in r.items() if isinstance(v, float) and kk.startswith("["))
        cur = r.get(json.dumps(current, separators=(",", ":")))
        print(f"{qtype} {name} M={m} cuBLAS {[v for kk, v in r.items() if not kk.startswith('[')][0]*1e3:.1f}"
              f" current {cur*1e3 if isinstance(cur, float) else float('nan'):.1f} best "
              + "; ".join(f"{v*1e3:.1f} {kk}" for v, kk in timed[:3]), flush=True)
        if m == rows[0]:
            order = [json.loads(kk) for _, kk in timed[:4]]
            if current not in order:
                order.append(current)
        if out:
            Path(out).write_text(json.dumps(res, indent=1))


def grouped(rows: list[int], out: str | None, int8_rows: list[int]) -> dict:
    """us per launch of each planes tile over an int4 block's launches (BLOCK), x in plane order
    once (as the norms write it), over copies of the weights from HBM (bench_kernels.bench),
    each checked against float32 math; bfloat16 cuBLAS over the same [sum N, K] beside it. The
    best at the first row count are timed at the others too. Then the int8 tiles over LLaMA-7B's
    three shapes (float16 x) at `int8_rows`."""
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "rows": {}}
    for name, shapes in BLOCK.items():
        time_tiles(name, "int4", shapes, rows, grouped_configs(), torch.bfloat16, res, out)
    for name, shape in (("o", (4096, 4096)), ("gate", (11008, 4096)), ("down", (4096, 11008))):
        time_tiles(name, "int8", (shape,), int8_rows, int8_configs(), torch.float16, res, out)
    return res


def ir_counts() -> dict:
    """Op counts in the Triton IR of every compiled kernel in TRITON_CACHE_DIR, and its registers."""
    out = {}
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    for f in glob.glob(f"{cache}/**/*.ttgir", recursive=True):
        text = Path(f).read_text()
        name = Path(f).stem
        ops = {op: len(re.findall(op, text)) for op in (
            "ttg.convert_layout", "ttg.local_alloc", "ttg.local_load", "ttg.local_store",
            "ttng.warp_group_dot", "tt.dot", "ttg.async_copy_global_to_local", "tt.join",
            "tt.reshape", "tt.load")}
        meta = Path(f).with_suffix(".json")
        if meta.exists():
            md = json.loads(meta.read_text())
            ops["shared"] = md.get("shared")
            ops["num_warps"] = md.get("num_warps")
        out[f"{name}/{Path(f).parent.name[:8]}"] = ops
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("time", "ncu", "grouped"))
    ap.add_argument("--out")
    ap.add_argument("--rows", default="1,16,64,512")
    ap.add_argument("--int8-rows", default="1,16", help="grouped: the int8 tiles' row counts")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.mode == "grouped":
        grouped([int(r) for r in a.rows.split(",")], a.out, [int(r) for r in a.int8_rows.split(",")])
        return
    if a.mode == "ncu":  # warm, then one launch of each, 11008 x 4096 at 16 rows
        ws = weights(11008, 4096)
        x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
        cur = tg.Config(*kernels_cuda.CHOICES["int4"][1][1])
        for i in range(4):
            if i == 3:  # ncu --profile-from-start off: only this round
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
            tg.matmul(x, ws["int4"][0], cur)
            planes(x, ws["int4"][0], bn=128, split=0, stages=3, asm=True)
            torch.ops.aten._weight_int4pack_mm(x[:1], ws["int4"][0].data, 128, ws["int4"][0].scales)
            F.linear(x, ws["bfloat16"][0])
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "rows": {}}
    for n, k in SHAPES:
        ws = weights(n, k)
        wf = ws["int4"][0].dequantize(torch.float32)
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wf.T
            r = {"bfloat16": bench([lambda w=w: F.linear(x, w) for w in ws["bfloat16"]]),
                 "current": bench([lambda w=w: kernels_cuda.linear(w, x) for w in ws["int4"]])}
            if m <= 64:
                r["tinygemm"] = bench([lambda w=w: torch.ops.aten._weight_int4pack_mm(
                    x, w.data, w.group_size, w.scales) for w in ws["int4"]])
            if m > 64:  # the dequantize step alone, by rows per program
                buf = torch.empty(n * k, dtype=x.dtype, device="cuda")
                for bn in DEQUANT_BN:
                    r[f"dequant_bn{bn}"] = bench([lambda w=w: tg.dequantize_into(
                        w, buf, planes=True, block_n=bn) for w in ws["int4"]])
                r["dequant_input_order_bn16"] = bench([lambda w=w: tg.dequantize_into(
                    w, buf, planes=False, block_n=16) for w in ws["int4"]])
            else:  # the planes tile with one x for every copy: x put in plane order once
                g = PLANES[1]
                r["planes_noperm" + json.dumps(g, separators=(",", ":"))] = bench(
                    [lambda w=w: planes(x, w, **g) for w in ws["int4"]])
                r["permute_x"] = bench([lambda w=w: tg.permute_x(x, w) for w in ws["int4"]])
            xs = [x.clone() for _ in ws["int4"]]  # an x per copy: the permutation every matmul
            for g in (PLANES if m <= 64 else []):
                key = "planes" + json.dumps(g, separators=(",", ":"))
                try:
                    y = planes(x, ws["int4"][0], **g)
                    err = float((y.float() - ref).norm() / ref.norm())
                    r[key] = bench([lambda w=w, xi=xi: planes(xi, w, **g)
                                    for w, xi in zip(ws["int4"], xs)])
                    r[key + "/err"] = err
                except Exception as e:  # a launch shape Triton cannot compile
                    r[key] = f"{type(e).__name__}: {str(e)[:160]}"
            res["rows"][f"{n}x{k}/{m}"] = r
            best = min((v, kk) for kk, v in r.items() if isinstance(v, float) and "/err" not in kk)
            print(f"{n}x{k} M={m} bf16 {r['bfloat16']*1e3:.1f} cur {r['current']*1e3:.1f} "
                  f"best {best[0]*1e3:.1f} {best[1]}", flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(res, indent=1))
    res["ir"] = ir_counts()
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["ir"], indent=1))


if __name__ == "__main__":
    main()
