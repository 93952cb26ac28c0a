"""The CPU decode path's pieces, each against what it replaced, over the default model's weights.

    OMP_NUM_THREADS=2 PYTHONPATH=. python3 benchmarks/bench_cpu_ops.py --threads 2 --reps 30

For one token (M=1; --m for more rows) over SmolLM2-135M's 30 blocks, interleaved A/B, each
variant timed --reps times (best and median, ms for the 30 blocks), the load average before and
after (the machine is shared: compare rows of one run):

- proj:  the q/k/v and gate/up int4 matmuls as five PackedInt4 (before) or two FusedInt4
         (gdsllm.quant.kernels_cpu), torch memory;
- rope:  the rotary embedding of q and of k (layers.apply_rope twice) or once over both, side
         by side in the fused output (layers.self_attention);
- norm:  layers.rms_norm's general form (casts to float32 and back) or its float32 path.

Each A/B pair is checked bit for bit before it is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from gdsllm.convert.default_model import default_model_dir
from gdsllm.format.metadata import load_model_meta
from gdsllm.models import layers
from gdsllm.models.views import unit_tensors
from gdsllm.quant.kernels_cpu import FusedInt4, PackedInt4


def blocks():
    meta = load_model_meta(default_model_dir())
    out = []
    for unit in meta.units:
        if unit.kind == "block":
            buf = torch.from_file(str(meta.path(unit)), size=unit.nbytes, dtype=torch.uint8).clone()
            out.append(unit_tensors(unit, buf))
    return meta.params, out


def general_rms_norm(x, weight, eps):
    """layers.rms_norm before its float32 path (transformers' LlamaRMSNorm, casts and all)."""
    in_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(in_dtype) * h.to(in_dtype)


def timed(variants: dict, reps: int) -> dict:
    for f in variants.values():  # warm
        f()
    t = {n: [] for n in variants}
    for _ in range(reps):
        for n, f in variants.items():
            t0 = time.perf_counter()
            f()
            t[n].append(time.perf_counter() - t0)
    return {n: {"best_ms": round(min(v) * 1e3, 3), "median_ms": round(sorted(v)[len(v) // 2] * 1e3, 3)}
            for n, v in t.items()}


def same(a, b) -> None:
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y), "A/B outputs differ"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--m", type=int, default=1, help="rows (tokens)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p, ws = blocks()
    nh, nkv, hd, eps = p.num_attention_heads, p.num_key_value_heads, p.head_dim, p.rms_norm_eps
    qkv_names = layers.FUSED["self_attn.qkv_proj.weight"]
    gu_names = layers.FUSED["mlp.gate_up_proj.weight"]
    x = torch.randn(args.m, p.hidden_size)
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": args.threads,
           "m": args.m, "load_average_start": os.getloadavg()}

    sep = [({n: PackedInt4.of(w[n]) for n in qkv_names + gu_names}) for w in ws]
    fused = [(FusedInt4.of([w[n] for n in qkv_names]), FusedInt4.of([w[n] for n in gu_names]))
             for w in ws]

    def proj_sep():
        return tuple(torch.cat([b[n].linear(x) for n in qkv_names + gu_names], 1) for b in sep)

    def proj_fused():
        return tuple(torch.cat([f.linear(x), g.linear(x)], 1) for f, g in fused)

    same(proj_sep(), proj_fused())
    res["proj"] = timed({"five PackedInt4": proj_sep, "two FusedInt4": proj_fused}, args.reps)

    T = args.m
    qkv = torch.randn(T, (nh + 2 * nkv) * hd)
    pos = torch.arange(T) + 100
    cos, sin = layers.rope_cos_sin(layers.rope_inv_freq(p), pos, torch.float32)

    def rope_two():
        out = []
        for _ in ws:
            q = qkv[:, : nh * hd].view(T, nh, hd)
            k = qkv[:, nh * hd: (nh + nkv) * hd].view(T, nkv, hd)
            out += [layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)]
        return tuple(out)

    def rope_one():
        out = []
        for _ in ws:
            qk = layers.apply_rope(qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)
            out += [qk[:, :nh], qk[:, nh:]]
        return tuple(out)

    same(rope_two(), rope_one())
    res["rope"] = timed({"q and k apart": rope_two, "q and k together": rope_one}, args.reps)

    norm_w = [w["input_layernorm.weight"].float() for w in ws]

    def norm_general():
        return tuple(general_rms_norm(x, w, eps) for w in norm_w for _ in range(2))

    def norm_f32():
        return tuple(layers.rms_norm(x, w, eps) for w in norm_w for _ in range(2))

    same(norm_general(), norm_f32())
    res["norm"] = timed({"general": norm_general, "float32 path": norm_f32}, args.reps)
    res["load_average_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
