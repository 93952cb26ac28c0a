"""Issue 22's ratios with their spread: the resident 7B models side by side in ONE process.

    PYTHONPATH=. python3 benchmarks/pair_loop.py --work /root/gl --rounds 4 --out $OUT/pair.json
    PYTHONPATH=. python3 benchmarks/pair_loop.py --quick     # the whole script on the CPU, tiny models

bench_loop.py measures each model in a process of its own, one after another, so a ratio of two
of its rows is a ratio of two moments of a VM whose host speed drifts (float16's own prefill row
measured 0.017, 0.036 and 0.019 s in three runs). Here one `LLM` per qtype (--qtypes, the models
of `bench_loop.py --parts synth,quantize` in --work) is opened in the same process, each with a
KV cache of its own fixed size, and --rounds rounds measure each in turn (the order rotated every
round) exactly as bench_loop.py's `llm_resident` rows do: decode ms/token at batch 1 and at
--batch ((n tokens - 1 token) / (n - 1), best of 3), the first token of a --prefill-tokens prompt
(best of 3). Each round gives its own ratios against float16; the report has their median, least
and largest. Then (--profile) one batch --batch decode and one prefill per qtype under
torch.profiler: wall time against the union of the kernels' intervals (the GPU's busy time), so
what part of a ratio is the GPU's and what the host's shows.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_loop, profile_decode  # noqa: E402


def open_models(a) -> dict:
    from gdsllm import LLM
    llms = {}
    for q in a.qtypes:
        llms[q] = LLM(str(bench_loop.model_dir(a, q)), device=a.device, max_batch=a.batch,
                      kv_tokens=profile_decode.fixed_kv_tokens(a.batch, a.tokens, a.prefill_tokens))
    return llms


def measure(a, q: str, llm) -> dict:
    b = SimpleNamespace(device=a.device, tokens=a.tokens, prefill_tokens=a.prefill_tokens,
                        model=bench_loop.model_dir(a, q))
    one = bench_loop.llm_decode(b, llm, 1)
    many = bench_loop.llm_decode(b, llm, a.batch)
    pre = bench_loop.llm_prefill(b, llm)
    return {"b1_ms": one["ms_per_token"], "batch_ms": many["ms_per_token"],
            "batch_tok_s": many["aggregate_tok_per_s"], "prefill_s": pre["first_token_s"],
            "b1_ids": one["token_ids"], "batch_ids": many["token_ids"]}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def summary(rounds: list[dict], qtypes: tuple[str, ...]) -> dict:
    out = {}
    for q in qtypes:
        out[q] = {k: spread([r[q][k] for r in rounds]) for k in ("b1_ms", "batch_ms", "batch_tok_s", "prefill_s")}
    base = "float16" if "float16" in qtypes else None
    for q in qtypes:
        if base is None or q == base:
            continue
        out[f"{q}_over_float16"] = {
            "batch_aggregate": spread([r[q]["batch_tok_s"] / r[base]["batch_tok_s"] for r in rounds]),
            "prefill": spread([r[q]["prefill_s"] / r[base]["prefill_s"] for r in rounds])}
    return out


def profiles(a, llms: dict) -> dict:
    """One batch decode and one prefill per qtype under torch.profiler (profile_decode.py's)."""
    res = {}
    prompts = [f"{bench_loop.PROMPT} {i}" for i in range(a.batch)]
    for q, llm in llms.items():
        vocab = llm.meta.params.vocab_size
        d = profile_decode.profile(llm, prompts, a.profile_tokens, a.top)
        d["python_top"] = profile_decode.python_top(lambda: llm.generate(prompts, bench_loop.greedy(a.profile_tokens + 1)), a.top)
        p = profile_decode.prefill(llm, vocab, a.prefill_tokens, a.top)
        res[q] = {"decode": d, "prefill": p}
        print(f"== profile {q}: b{a.batch} wall {d['wall_ms_per_token']:.3f} ms/token, GPU busy "
              f"{d['gpu_busy_ms_per_pass']:.3f} ms/pass; prefill {p['first_token_ms']:.2f} ms, "
              f"profiled {p['profiled_ms']:.2f}, GPU busy {p['gpu_busy_ms']:.2f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="bench_loop.py's models (default /tmp/gdsllm-loop)")
    ap.add_argument("--quick", action="store_true", help="CPU, tiny models, few tokens: checks the script")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--qtypes", default="float16,int4,int8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--profile", action="store_true", help="then torch.profiler over one decode and one prefill")
    ap.add_argument("--profile-tokens", type=int, default=8)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--toggle", default=None, help="MODULE.FLAG: a boolean set in even rounds, cleared in odd "
                    "ones (an A/B in the same process), reported by its value too")
    ap.add_argument("--deadline-s", type=float, default=None, help="no new round after this many seconds")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    a.qtypes = tuple(a.qtypes.split(","))
    t0 = time.monotonic()
    if a.quick:  # the models of bench_loop.py --quick, made here
        a.device, a.batch, a.tokens, a.prefill_tokens = "cpu", 2, 4, 16
        a.rounds, a.profile_tokens = min(a.rounds, 2), 2
        if a.work is None:
            a.work = Path(tempfile.mkdtemp(prefix="gdsllm-pair-quick-"))
            atexit.register(shutil.rmtree, a.work, True)
        bench_loop.sh([sys.executable, str(Path(bench_loop.__file__)), "--quick", "--work", str(a.work),
                       "--parts", "synth,quantize"], a.work / "prep.log")
    a.work = (a.work or Path("/tmp/gdsllm-loop")).resolve()
    import torch
    res = {"run": {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "device": a.device,
                   "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
                   "torch": torch.__version__, "batch": a.batch, "tokens": a.tokens,
                   "prefill_tokens": a.prefill_tokens, "qtypes": a.qtypes}, "rounds": []}

    def save() -> None:
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))

    if a.toggle:
        import importlib
        mod, flag = a.toggle.rsplit(".", 1)
        toggled = importlib.import_module(mod)
        before = getattr(toggled, flag)
        res["run"]["toggle"] = a.toggle
    llms = open_models(a)
    for r in range(a.rounds):
        if a.deadline_s is not None and r and time.monotonic() - t0 > a.deadline_s:
            res["stopped"] = f"deadline after {r} rounds"
            break
        order = a.qtypes[r % len(a.qtypes):] + a.qtypes[:r % len(a.qtypes)]
        if a.toggle:  # an A/B inside the pairing: the flag on in even rounds, off in odd ones
            setattr(toggled, flag, r % 2 == 0)
        row = {q: measure(a, q, llms[q]) for q in order}
        if a.toggle:
            row["toggle"] = r % 2 == 0
        res["rounds"].append(row)
        print(f"== round {r}{' ' + flag + '=' + str(row['toggle']) if a.toggle else ''}: " + "; ".join(
            f"{q} b1 {row[q]['b1_ms']:.3f} ms, b{a.batch} {row[q]['batch_tok_s']:.0f} tok/s, "
            f"prefill {row[q]['prefill_s'] * 1e3:.1f} ms" for q in a.qtypes), flush=True)
        res["summary"] = summary(res["rounds"], a.qtypes)
        if a.toggle:
            res["summary_by_toggle"] = {str(on): summary([x for x in res["rounds"] if x["toggle"] == on], a.qtypes)
                                        for on in (True, False) if any(x["toggle"] == on for x in res["rounds"])}
        save()
    tokens_equal = {q: all(r[q]["batch_ids"] == res["rounds"][0][q]["batch_ids"] for r in res["rounds"])
                    for q in a.qtypes}
    res["same_tokens_every_round"] = tokens_equal
    for k, v in res.get("summary", {}).items():
        if k.endswith("_over_float16"):
            print(f"== {k}: batch aggregate median {v['batch_aggregate']['median']:.3f} "
                  f"({v['batch_aggregate']['min']:.3f}-{v['batch_aggregate']['max']:.3f}), prefill median "
                  f"{v['prefill']['median']:.3f} ({v['prefill']['min']:.3f}-{v['prefill']['max']:.3f})", flush=True)
        else:
            print(f"== {k}: b1 median {v['b1_ms']['median']:.3f} ms ({v['b1_ms']['min']:.3f}-{v['b1_ms']['max']:.3f})",
                  flush=True)
    for on, sm in res.get("summary_by_toggle", {}).items():
        print(f"== {a.toggle}={on}: " + "; ".join(
            f"{q} prefill median {sm[q]['prefill_s']['median'] * 1e3:.1f} ms, b{a.batch} "
            f"{sm[q]['batch_tok_s']['median']:.0f} tok/s" for q in a.qtypes), flush=True)
    if a.toggle:
        setattr(toggled, flag, before)
    save()
    if a.profile:
        res["profile"] = profiles(a, llms)
        save()
    for llm in llms.values():
        llm.close()
    llms.clear()
    gc.collect()


if __name__ == "__main__":
    main()
