"""Probe (issue 22): why the whole-tile Triton W4A16 GEMM read int4 at ~0.8 TB/s at 16 rows, and
the tile that replaced it (now gdsllm.quant.triton_gemm's `Config.planes`). For the lent GPU.

    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py time --rows 1,8,16,32,64,512 --out /tmp/w4.json
    PYTHONPATH=. python3 benchmarks/probe_w4_tiles.py ncu   # under ncu --profile-from-start off:
        # one launch each of the tile kernels_cuda runs at 16 rows, the planes tile, tinygemm and
        # cuBLAS bfloat16 at 11008 x 4096

`time`: us per matmul over the LLaMA-7B shapes (bench_kernels' graphs over 256 MiB of weight
copies, every weight from HBM): bfloat16 cuBLAS, what kernels_cuda runs, tinygemm, and this
file's own copy of the planes tile (`_w4_planes`: the words loaded once, one tl.dot per nibble
plane) over a grid of launch shapes, each checked against float32 math; the planes tile without
the permutation of x and the permutation alone; at 512 rows the dequantization step alone by
rows per program. Then the Triton IR op counts of every kernel compiled (layout conversions,
shared-memory buffers). Raw results of 2026-12-04 on the H200: docs/probe-w4-tiles-2026-12-04-
h200.json; the ncu sections of the whole tile and the planes tile: docs/ncu-w4-tiles-2026-12-04-
h200.txt; a first version of this probe timed a tile that loads each word once per nibble
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
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, bench, weights  # noqa: E402

from gdsllm.format.quant_layout import inner_k_tiles  # noqa: E402
from gdsllm.quant import kernels_cuda, triton_gemm as tg  # noqa: E402
from gdsllm.quant.triton_gemm import _int4_planes_asm  # noqa: E402


@triton.jit(do_not_specialize=["M"])
def _w4_planes(x_ptr, q_ptr, sz_ptr, y_ptr, ws_ptr, lock_ptr, M, N, KO, stride_xm, stride_ym,
               per_split, G: tl.constexpr, T: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr,
               STAGES: tl.constexpr, ASM: tl.constexpr):
    """One k-block (16T inputs) a step, x permuted as permute_x (plane order: plane p of the
    block is x's columns p 2T .. p 2T + 2T). The stored words [BLOCK_N, 2T] are loaded once and
    each nibble plane, unpacked by elementwise ops only (no join / reshape), is multiplied by its
    x columns in its own tl.dot (K = 2T): the words, not the unpacked weights, are what a layout
    conversion would move. Groups span the step (G % 16T == 0): integers in the products, the
    group's (scale, zero) applied once per step."""
    W: tl.constexpr = 2 * T
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    col = tl.arange(0, W)
    rowbase = (offs_n // 8) * KO * (16 * T) + (offs_n % 8) * W
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if DT == tl.bfloat16:  # bits magic | q = 128 + q (bfloat16) / 1024 + q (float16)
        MAGIC: tl.constexpr = 0x4300
        SUB: tl.constexpr = 136.0
    else:
        MAGIC: tl.constexpr = 0x6400
        SUB: tl.constexpr = 1032.0
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = tl.program_id(2) * per_split
    end = tl.minimum(start + per_split, KO)
    for ko in tl.range(start, end, 1, num_stages=STAGES):
        words = tl.load(q_ptr + rowbase[:, None] + (ko * (16 * T) + col)[None, :],
                        mask=mask_n[:, None], other=0)
        if SWAP:
            t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sx = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if ASM:  # the 8 planes two words per instruction (triton_gemm._unpack_asm)
            ps = _int4_planes_asm(words, DT)
        for p in tl.static_range(8):
            if ASM:
                w = ps[p]
            else:
                q = ((words >> (4 * p)) & 15).to(tl.int16)
                w = (q | MAGIC).to(DT, bitcast=True) - SUB
            xp = tl.load(x_ptr + offs_m[:, None] * stride_xm + (ko * (16 * T) + p * W + col)[None, :],
                         mask=mask_m[:, None], other=0.0)
            sx += tl.sum(xp.to(tl.float32), axis=1)
            if SWAP:
                t = tl.dot(w, tl.trans(xp), t)
            else:
                t = tl.dot(xp, tl.trans(w), t)
        sz = tl.load(sz_ptr + (ko * (16 * T)) // G * N + offs_n, mask=mask_n, other=0)
        s = (sz << 16).to(tl.float32, bitcast=True)
        z = (sz & -65536).to(tl.float32, bitcast=True)
        if SWAP:
            acc += t * s[:, None] + z[:, None] * sx[None, :]
        else:
            acc += t * s[None, :] + sx[:, None] * z[None, :]
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    mask = mask_m[:, None] & mask_n[None, :]
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + tl.program_id(2) * M * N, out, mask=mask)
        tl.debug_barrier()
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        seen = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if seen == SPLIT - 1:
            total = tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLIT):
                total += tl.load(part + i * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


def planes(x, w, bm=16, bn=64, split=8, warps=4, stages=4, swap=True, asm=False, xk=None):
    n, k = w.shape
    m = x.shape[0]
    t = inner_k_tiles(k)
    ko = k // (16 * t)
    assert w.group_size % (16 * t) == 0 and x.dtype != torch.float32
    grid = [triton.cdiv(n, bn), triton.cdiv(m, bm), 1]
    split = max(1, min(split, ko))
    per = triton.cdiv(ko, split)
    grid[2] = split = triton.cdiv(ko, per)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    locks = tg.lock_buffer(x.device)
    xk = tg.permute_x(x, w) if xk is None else xk
    _w4_planes[tuple(grid)](xk, w.data, w.scales.view(torch.int32), y, ws, locks, m, n, ko,
                            xk.stride(0), y.stride(0), per, G=w.group_size, T=t, BLOCK_M=bm,
                            BLOCK_N=bn, SPLIT=split, SWAP=swap, STAGES=stages, ASM=asm,
                            num_warps=warps, num_stages=stages)
    return y


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
            planes(x, ws["int4"][0], bn=128, split=4, stages=3, asm=True)
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
            else:  # the planes tile without the permutation of x (done once, outside)
                g = PLANES[1]
                xk = tg.permute_x(x, ws["int4"][0])
                r["planes_noperm" + json.dumps(g, separators=(",", ":"))] = bench(
                    [lambda w=w: planes(x, w, xk=xk, **g) for w in ws["int4"]])
                r["permute_x"] = bench([lambda w=w: tg.permute_x(x, w) for w in ws["int4"]])
            for g in (PLANES if m <= 64 else []):
                key = "planes" + json.dumps(g, separators=(",", ":"))
                try:
                    y = planes(x, ws["int4"][0], **g)
                    err = float((y.float() - ref).norm() / ref.norm())
                    r[key] = bench([lambda w=w: planes(x, w, **g) for w in ws["int4"]])
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
