"""`LLM` streaming a model larger than its budget, against the disk, before and after the prefetch
window (issue 21), one run on a GPU machine as root (it drops the page cache), from the repository
root:

    PYTHONPATH=. python3 benchmarks/bench_prefetch.py --work /root/gp --parts synth,ceiling,llm,table \
        [--before /path/to/an/older/checkout]

Parts: synth (the LLaMA-7B-shaped float16 model, no Hugging Face copy), ceiling (bench_7b's: the
best raw cold reader of the model's files), llm (`LLM(device="cuda", vram_budget=BUDGET)` decoding
`--tokens` greedy tokens with prefetch windows 1, 2 and 4, and, with --before, the same with the
code of that checkout (`--windows` picks them), each in its own process; cold: the page cache is dropped first; s/token is
(time for n tokens - time for 1) / (n - 1), the prompt's pass left out), table. Every row's
streamed GB/s is the streamed bytes per pass over its s/token; "/ bound" is its s/token over the
same run's ceiling time for those bytes. Results accumulate in WORK/results-prefetch.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_7b import part_ceiling, run_parts, sh  # noqa: E402,F401  (part_ceiling: a part)

PROMPT = "The storage hierarchy of a language model"

ONE = r"""
import json, sys, time
import torch
from gdsllm import LLM, SamplingParams
from gdsllm.service.benchmark import drop_caches
model, device, budget, window, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
kw = {} if window == 0 else {"prefetch_window": window}
llm = LLM(model, device=device, vram_budget=budget, **kw)
sp = lambda k: SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
def timed(k):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = llm.generate(PROMPT, sp(k))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out
drop_caches()
timed(1)  # warm-up: kernels, allocator; the weights still come cold from the disk every pass
t1, _ = timed(1)
tn, out = timed(n)
p = llm.plan
print(json.dumps({"s_per_token": (tn - t1) / (n - 1), "first_token_s": t1, "tokens": n,
                  "streamed_bytes_per_pass": p.streamed_bytes_per_pass, "resident_units": len(p.resident_offsets),
                  "streamed_units": len(p.streamed), "slots": p.num_slots, "io_path": llm.io_path,
                  "token_ids": out.token_ids}))
""".replace("PROMPT", repr(PROMPT))


def part_synth(a, res):
    if (a.model / "metadata.json").exists():
        return
    t0 = time.perf_counter()
    sh([sys.executable, "-m", "gdsllm", "synth", str(a.model), "--shape", a.shape, "--dtype", "float16"], a.log)
    res["synth_s"] = time.perf_counter() - t0


def one(a, code_root: Path, window: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{code_root}:{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-c", ONE, str(a.model), a.device, a.budget, str(window), str(a.tokens)],
                       capture_output=True, text=True, env=env, cwd=code_root)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def part_llm(a, res):
    here = Path(__file__).resolve().parent.parent
    runs = [("before", a.before, 0)] if a.before else []
    runs += [(f"window{w}", here, int(w)) for w in a.windows.split(",")]
    for key, root, w in runs:
        try:
            r = one(a, Path(root).resolve(), w)
        except Exception as e:  # one failed row must not lose the others
            res.setdefault("errors", {})[key] = str(e)
            print(key, "failed:", e, flush=True)
            continue
        r["streamed_GBps"] = r["streamed_bytes_per_pass"] / r["s_per_token"] / 1e9
        ceiling = res.get("ceiling", {}).get("bytes_per_s")
        if ceiling:
            r["over_bound"] = r["s_per_token"] / (r["streamed_bytes_per_pass"] / ceiling)
        res.setdefault("llm", {})[key] = r
        print(key, json.dumps({k: v for k, v in r.items() if k != "token_ids"}), flush=True)


def part_table(a, res):
    rows = res.get("llm", {})
    c = res.get("ceiling", {})
    lines = [f"ceiling: {c.get('bytes_per_s', 0) / 1e9:.2f} GB/s ({c.get('reader', '-')})", "",
             "| LLM | slots | streamed/pass | s/token | streamed GB/s | / bound | same tokens |",
             "|---|---|---|---|---|---|---|"]
    ref = next(iter(rows.values()), {}).get("token_ids")
    for key, r in rows.items():
        lines.append(f"| {key} | {r['slots']} | {r['streamed_bytes_per_pass'] / 1e9:.2f} GB | {r['s_per_token']:.3f} | "
                     f"{r['streamed_GBps']:.2f} | {r.get('over_bound', float('nan')):.2f} | "
                     f"{'yes' if r['token_ids'] == ref else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    (a.work / "table-prefetch.md").write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gdsllm-prefetch"))
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--budget", default="2GiB")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--before", default=None, help="a checkout of the code before the change")
    ap.add_argument("--windows", default="1,2,4", help="prefetch windows to measure")
    ap.add_argument("--parts", default="synth,ceiling,llm,table")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.model, a.log = a.work / "model", a.work / "bench.log"
    run_parts(a, {name[5:]: f for name, f in globals().items() if name.startswith("part_")},
              a.work / "results-prefetch.json")


if __name__ == "__main__":
    main()
