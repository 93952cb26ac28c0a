"""The CPU matmul candidates for resident quantized weights, over the default model's own weights
(issue 25: decode is bound by reading float32 copies of the int4 weights).

    OMP_NUM_THREADS=2 PYTHONPATH=. python3 benchmarks/bench_cpu_linear.py --threads 2 --m 1,256

For every quantized weight of SmolLM2-135M (the 210 block projections and the tied int8
embedding as LM head: one token's 211 matmuls, each over its own memory, as a pass reads them),
each candidate's time for the whole set at M rows (best of --repeats), and its error against
float32 math over the float32 dequantized weight (max |y - ref| / max |ref| over all weights):

- f32:        F.linear(x, W32), W32 the float32 copy (today's HostCopies)
- f16, bf16:  F.linear(x.to(d), W.to(d)).float(), a half-precision copy
- int4pack:   torch._weight_int4pack_mm_for_cpu over the weight repacked once
              (_convert_weight_to_int4pack_for_cpu), float32 activations and scales (int4 only)
- int4pack_bf16: the same with bfloat16 activations and the stored bfloat16 scales
- deq:        dequantize per call, then F.linear (gdsllm.quant.kernels_cpu, what streams)

Bytes: what each candidate keeps resident for the set. Run on a machine otherwise idle; the load
average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from gdsllm.convert.default_model import default_model_dir
from gdsllm.format.metadata import load_model_meta
from gdsllm.models.views import unit_tensors
from gdsllm.quant.int4pack import unpack_int4
from gdsllm.quant.schemes import QuantWeight


def model_weights() -> list[QuantWeight]:
    meta = load_model_meta(default_model_dir())
    out = []
    for unit in meta.units:
        buf = torch.from_file(str(meta.path(unit)), size=unit.nbytes, dtype=torch.uint8)
        out += [w for w in unit_tensors(unit, buf).values() if isinstance(w, QuantWeight)]
    return out


def candidates(w: QuantWeight) -> dict:
    """name -> (fn(x) -> float32 y, resident bytes)."""
    w32 = w.dequantize(torch.float32)
    c = {"f32": (lambda x: F.linear(x, w32), w32.nbytes)}
    for name, d in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        wd = w32.to(d)  # one rounding of the float32 value
        c[name] = ((lambda x, wd=wd, d=d: F.linear(x.to(d), wd).float()), wd.nbytes)
    if w.qtype == "int4":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(w.data, w.shape).to(torch.int32), 2)
        sz = w.scales.float().contiguous()
        g = w.group_size
        c["int4pack"] = ((lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)),
                         packed.nbytes + sz.nbytes)
        sb = w.scales  # bfloat16 as stored
        c["int4pack_bf16"] = (
            (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, g, sb).float()),
            packed.nbytes + sb.nbytes)
    c["deq"] = ((lambda x: F.linear(x, w.dequantize(torch.float32))),
                w.data.nbytes + w.scales.nbytes)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", default="1,256", help="rows (tokens) per matmul, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="", help="candidates not to time, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    res = {"threads": args.threads, "torch": torch.__version__, "load_start": os.getloadavg()}
    ws = model_weights()
    cands = [candidates(w) for w in ws]
    names = [n for n in dict.fromkeys(k for c in cands for k in c) if n not in skip]
    res["resident_MB"] = {f"{q}/{n}": round(sum(c[n][1] for c, w in zip(cands, ws)
                                                if n in c and w.qtype == q) / 1e6, 1)
                          for q in ("int4", "int8") for n in names
                          if any(n in c and w.qtype == q for c, w in zip(cands, ws))}
    g = torch.Generator().manual_seed(0)
    for m in map(int, args.m.split(",")):
        xs = [torch.randn(m, w.shape[1], generator=g) for w in ws]
        refs = [c["f32"][0](x) for c, x in zip(cands, xs)]
        row = {}
        for part, qtype in (("int4", "int4"), ("int8", "int8")):  # the blocks; the LM head
            sel = [i for i, w in enumerate(ws) if w.qtype == qtype]
            for n in names:
                if n not in cands[sel[0]]:  # int4pack: int4 only
                    continue
                err = max(((cands[i][n][0](xs[i]) - refs[i]).abs().max() / refs[i].abs().max()
                           ).item() for i in sel)
                best = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    for i in sel:
                        cands[i][n][0](xs[i])
                    best = min(best, time.perf_counter() - t0)
                row[f"{part}/{n}"] = {"ms": round(best * 1e3, 2), "rel_err": float(f"{err:.2e}")}
        res[f"m{m}"] = row
        print(f"M={m}: {json.dumps(row)}", flush=True)
    res["load_end"] = os.getloadavg()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
