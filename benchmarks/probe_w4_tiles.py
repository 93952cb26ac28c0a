"""Probe (issue 22): why the whole-tile Triton W4A16 GEMM read int4 at ~0.8 TB/s at 16 rows, and
the tile that replaced it (now gdsllm.quant.triton_gemm's `Config.planes`). For the lent GPU.

    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py time --rows 1,8,16,32,64,512 --out /tmp/w4.json
    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py ncu   # under ncu --profile-from-start off:
        # one launch each of the tile kernels_cuda runs at 16 rows, the planes tile, tinygemm and
        # cuBLAS bfloat16 at 11008 x 4096

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
    ap.add_argument("mode", choices=("time", "ncu"))
    ap.add_argument("--out")
    ap.add_argument("--rows", default="1,16,64,512")
    a = ap.parse_args()
    torch.manual_seed(0)
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
