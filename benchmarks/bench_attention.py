"""Decode attention over a paged KV cache on CUDA: the Triton kernel against the torch reference
and the old path (one SDPA call per sequence over its contiguous keys), in microseconds per call.

    python3 benchmarks/bench_attention.py --out /tmp/attn.json            # torch + triton only
    python3 benchmarks/bench_attention.py --out /tmp/attn.json --sweep    # + launch configs

Shapes: LLaMA-7B (32 heads, 32 kv heads, D=128) and GQA (32 / 8), batch 1 and 16, every sequence
at context 512 and 4096, float16, block size 16, block tables a random permutation of the pool.
Per shape: `triton_us` (decode_attention_triton, default config and splits), `triton_graph_us`
(the same call captured in a CUDA graph, per replay), `ref_us` (decode_attention_ref),
`sdpa_loop_us` (the old path: a Python loop of SDPA calls, as gdsllm.models.layers.attention
makes them for one token) and `sdpa_loop_graph_us` (that loop captured), `kv_gbps` (K and V bytes
over triton_us) and `max_err` (Triton against the reference). With --sweep, `sweep` lists
triton_us for num_splits / block_n / num_warps / num_stages choices, and `best` the fastest.
All timed with CUDA events after a warm-up, the median of --repeats runs of --iters calls.
Prints the JSON object and writes it to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without PYTHONPATH
from gdsllm.models.paged_attention import (decode_attention_ref,  # noqa: E402
                                           decode_attention_triton)

SHAPES = {"llama7b": (32, 32, 128), "gqa": (32, 8, 128)}  # heads, kv heads, head dim
BLOCK = 16


def make_inputs(heads: int, kv_heads: int, d: int, batch: int, ctx: int, device: str = "cuda",
                dtype: torch.dtype = torch.float16):
    g = torch.Generator(device=device).manual_seed(0)
    nblk = ctx // BLOCK
    pool = batch * nblk + 1
    kw = dict(device=device, dtype=dtype, generator=g)
    k_pool = torch.randn(pool, BLOCK, kv_heads, d, **kw)
    v_pool = torch.randn(pool, BLOCK, kv_heads, d, **kw)
    tables = torch.randperm(pool, device=device, generator=g)[:batch * nblk]
    tables = tables.reshape(batch, nblk).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(batch, heads, d, **kw)
    # the old path's per-sequence caches: [1, kv_heads, ctx, d], contiguous
    keys = [k_pool[tables[b].long()].reshape(ctx, kv_heads, d).transpose(0, 1)[None].contiguous()
            for b in range(batch)]
    values = [v_pool[tables[b].long()].reshape(ctx, kv_heads, d).transpose(0, 1)[None]
              .contiguous() for b in range(batch)]
    return q, k_pool, v_pool, tables, lens, keys, values


def sdpa_loop(q, keys, values, scale):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]):
        gqa = q.shape[1] != keys[0].shape[1]
        rows = [F.scaled_dot_product_attention(q[b][None, :, None], keys[b], values[b],
                                               scale=scale, enable_gqa=gqa)
                for b in range(q.shape[0])]
    return torch.cat([r.reshape(1, -1) for r in rows])


def time_us(fn, iters: int, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(runs)


def graph_us(fn, iters: int, repeats: int) -> float | None:
    """Per replay of `fn` captured once in a CUDA graph (None if it cannot be captured)."""
    try:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        print(f"capture failed: {e}", file=sys.stderr)
        return None
    return round(time_us(graph.replay, iters, repeats), 2)


def sweep(args_, scale, iters, repeats):
    """The splits with the default tile config, then tile configs with the default splits."""
    rows = []
    configs = [(s, None, None, None) for s in (None, 1, 2, 4, 8, 16)]
    configs += [(None, bn, w, st) for bn, w, st in itertools.product([16, 32, 64, 128], [4, 8],
                                                                     [2, 3, 4])]
    for splits, bn, warps, stages in configs:
        def call():
            return decode_attention_triton(*args_, scale, num_splits=splits, block_n=bn,
                                           num_warps=warps, num_stages=stages)
        try:
            us = time_us(call, iters, repeats)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a config
            print(f"config {splits, bn, warps, stages} failed: {e}", file=sys.stderr)
            continue
        rows.append(dict(num_splits=splits or "auto", block_n=bn or "default",
                         num_warps=warps or "default", num_stages=stages or "default",
                         triton_us=round(us, 2)))
    return rows


def bench_shape(a, h: int, kvh: int, d: int, batch: int, ctx: int) -> dict:
    q, k_pool, v_pool, tables, lens, keys, values = make_inputs(h, kvh, d, batch, ctx)
    scale = d ** -0.5
    args_ = (q, k_pool, v_pool, tables, lens)
    row = dict(heads=h, kv_heads=kvh, head_dim=d, batch=batch, context=ctx)

    def tri():
        return decode_attention_triton(*args_, scale)

    def old():
        return sdpa_loop(q, keys, values, scale)
    ref = decode_attention_ref(*args_, scale).float()
    row["max_err"] = (tri().float() - ref).abs().max().item()
    row["max_err_old"] = (old().float() - ref).abs().max().item()
    row["triton_us"] = round(time_us(tri, a.iters, a.repeats), 2)
    row["triton_graph_us"] = graph_us(tri, a.iters, a.repeats)
    row["ref_us"] = round(time_us(lambda: decode_attention_ref(*args_, scale),
                                  max(1, a.iters // 5), a.repeats), 2)
    row["sdpa_loop_us"] = round(time_us(old, a.iters, a.repeats), 2)
    row["sdpa_loop_graph_us"] = graph_us(old, a.iters, a.repeats)
    kv_bytes = 2 * batch * ctx * kvh * d * 2  # K and V, float16
    row["kv_gbps"] = round(kv_bytes / row["triton_us"] / 1e3, 1)
    if a.sweep:
        row["sweep"] = sweep(args_, scale, a.iters, a.repeats)
        row["best"] = min(row["sweep"], key=lambda r: r["triton_us"], default=None)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also time launch configs")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "dtype": "float16", "block_size": BLOCK, "results": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    for (name, (h, kvh, d)), batch, ctx in itertools.product(SHAPES.items(), (1, 16),
                                                             (512, 4096)):
        row = bench_shape(a, h, kvh, d, batch, ctx)
        res["results"].append(dict(shape=name, **row))
        print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), file=sys.stderr,
              flush=True)
        torch.cuda.empty_cache()
    text = json.dumps(res)
    a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
