"""The quantization benchmark of docs/BENCHMARKS.md: float16, int8 and int4 at one budget, and
int4 against float16 fully resident, on the LLaMA-7B shape. For the lent GPU, as root.

    PYTHONPATH=. python3 benchmarks/bench_quant.py --work /tmp/gq --parts synth,quantize
    PYTHONPATH=. python3 benchmarks/bench_quant.py --work /tmp/gq --parts ceiling,stream,resident,table

Parts: synth (the float16 model and its Hugging Face copy, as bench_7b makes them; pass
`--work` of an earlier bench_7b run to reuse them), quantize (`gdsllm convert` of the Hugging Face
copy with --quant int8 and --quant int4, --group-size 128, timed), ceiling (bench_7b's raw cold
read, on the float16 files), stream (decode at --budget, cold and direct, for each model: bytes
streamed per token, s/token, and s/token over the ceiling's time for those bytes), resident
(decode with everything resident: int4 against float16 tokens/s), table. No repack happens at
load: int4 is written in the kernel's tile layout (gdsllm.quant.int4pack), so the load cost is
the read alone. Results accumulate in WORK/results-quant.json; every part can run on its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from benchmarks.bench_7b import GB, decode_run, part_ceiling, part_synth, run_parts, sh
from gdsllm.format.metadata import load_model_meta

QTYPES = ("float16", "int8", "int4")


def model_dir(a, q: str) -> Path:
    return a.model if q == "float16" else a.work / f"model-{q}"


def with_model(a, q: str):
    b = copy.copy(a)
    b.model = model_dir(a, q)
    return b


def part_quantize(a, res):
    for q in a.qtypes:
        dst = model_dir(a, q)
        if (dst / "metadata.json").exists():
            continue
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "gdsllm", "convert", str(a.hf), str(dst), "--dtype", "float16",
            "--quant", q, "--group-size", str(a.group_size)], a.log)
        res.setdefault("quantize_s", {})[q] = time.perf_counter() - t0
    for q in QTYPES:
        if (model_dir(a, q) / "metadata.json").exists():
            res.setdefault("model_bytes", {})[q] = load_model_meta(model_dir(a, q)).total_bytes
    print("model_bytes", json.dumps(res["model_bytes"]), flush=True)


def part_stream(a, res):
    ceiling = res.get("ceiling", {}).get("bytes_per_s")
    for q in QTYPES:
        b = with_model(a, q)
        decode_run(b, load_model_meta(b.model), f"stream_{q}", res, budget=a.budget)
        r = res[f"stream_{q}"]
        if ceiling and r["streamed_bytes_per_pass"]:
            r["ceiling_s_per_token"] = r["streamed_bytes_per_pass"] / ceiling
            r["over_ceiling"] = r["s_per_token"] / r["ceiling_s_per_token"]
    f16 = res["stream_float16"]["streamed_bytes_per_pass"]
    if not f16:
        raise ValueError(f"float16 streams nothing at --budget {a.budget}: pick a smaller budget")
    for q in QTYPES:
        res[f"stream_{q}"]["bytes_vs_float16"] = res[f"stream_{q}"]["streamed_bytes_per_pass"] / f16


def part_resident(a, res):
    for q in ("float16", "int4"):
        b = with_model(a, q)
        decode_run(b, load_model_meta(b.model), f"resident_{q}", res, budget=None, cold=False,
                   warm_first=True, n=max(a.tokens, 32))
    f, i = res["resident_float16"], res["resident_int4"]
    res["resident_int4_speedup"] = f["s_per_token"] / i["s_per_token"]


def part_resident_llm(a, res):
    """The same comparison through `LLM` (CUDA graphs, no service messages): batch-1 ms/token."""
    import torch

    from benchmarks.bench_resident import llm_decode
    from gdsllm import LLM
    for q in ("float16", "int4"):
        llm = LLM(with_model(a, q).model, device="cuda")
        res[f"resident_llm_{q}"] = llm_decode(llm, 1, 64)
        print(f"resident_llm_{q}", json.dumps(res[f"resident_llm_{q}"]), flush=True)
        llm.close()
        del llm
        torch.cuda.empty_cache()
    res["resident_llm_int4_speedup"] = (res["resident_llm_float16"]["ms_per_step"]
                                        / res["resident_llm_int4"]["ms_per_step"])


def part_table(a, res):
    lines = [f"{a.shape} shape, budget {a.budget}, ceiling "
             f"{res.get('ceiling', {}).get('bytes_per_s', 0) / GB:.2f} GB/s "
             f"({res.get('ceiling', {}).get('reader', '?')}), int4/int8 groups of {a.group_size}",
             "", "| model | file GB | streamed GB/token | vs float16 | s/token | ceiling s/token "
             "| ratio | resident tok/s |", "|---|---|---|---|---|---|---|---|"]
    for q in QTYPES:
        s, r = res.get(f"stream_{q}", {}), res.get(f"resident_{q}", {})
        tps = f"{1 / r['s_per_token']:.1f}" if r else "-"
        lines.append(f"| {q} | {res.get('model_bytes', {}).get(q, 0) / GB:.2f} "
                     f"| {s.get('streamed_bytes_per_pass', 0) / GB:.2f} "
                     f"| {s.get('bytes_vs_float16', 0):.3f} | {s.get('s_per_token', 0):.3f} "
                     f"| {s.get('ceiling_s_per_token', 0):.3f} | {s.get('over_ceiling', 0):.2f} "
                     f"| {tps} |")
    if "resident_int4_speedup" in res:
        lines.append(f"\nint4 resident decode: {res['resident_int4_speedup']:.2f}x float16's tokens/s")
    text = "\n".join(lines)
    print(text)
    (a.work / "table-quant.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gdsllm-bench"))
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--budget", default="2GiB")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--parts", default="synth,quantize,ceiling,stream,resident,table")
    ap.add_argument("--qtypes", default="int8,int4", help="quantize part: which to convert "
                    "(each one is a command of its own if 10 minutes do not fit both)")
    a = ap.parse_args()
    a.qtypes = [q for q in a.qtypes.split(",") if q]
    a.work.mkdir(parents=True, exist_ok=True)
    a.model, a.hf, a.log = a.work / "model", a.work / "model-hf", a.work / "bench-quant.log"
    parts = {"synth": part_synth, "quantize": part_quantize, "ceiling": part_ceiling,
             "resident_llm": part_resident_llm,
             "stream": part_stream, "resident": part_resident, "table": part_table}
    run_parts(a, parts, a.work / "results-quant.json")

if __name__ == "__main__":
    main()
