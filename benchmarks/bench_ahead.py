"""Batch-1 decode through `gdsllm serve` against `gdsllm.LLM`, with the pass scheduled ahead and
without (`--no-schedule-ahead`), and optionally an older checkout of the code ("before"), in
interleaved rounds on one machine (other work on it shifts every variant alike):

    PYTHONPATH=. python3 benchmarks/bench_ahead.py -m MODEL [--device cpu] [--tokens 64]
        [--rounds 5] [--before DIR] [--trace DIR]

Each round measures, for each variant, ms/token = (time of --tokens greedy tokens - time of 1)
/ (--tokens - 1), best of 3, on the client's clock (serve) or around LLM.generate; the summary
gives each variant's median over the rounds and serve / LLM. --before DIR: a copy of the package
at another commit (`git archive COMMIT | tar -x -C DIR`), served as "serve_before". --trace DIR:
each served variant writes DIR/<variant>.jsonl (GDSLLM_PASS_TRACE; benchmarks/pass_gaps.py).
All variants are up at once (max_batch 4; on CUDA each holds its own resident copy of the weights
and a KV cache of 4 GiB, LLM 4096 tokens). On an H200: `benchmarks/gpu_session.sh lprep ahead`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gdsllm.service.benchmark import Served  # noqa: E402

PROMPT = "The storage hierarchy of a language model"


def per_token(decode, n: int) -> float:
    """ms/token from the best of 3 of 1 token and of n tokens."""
    def best(k):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            decode(k)
            ts.append(time.perf_counter() - t0)
        return min(ts)
    return (best(n) - best(1)) / (n - 1) * 1e3


def served(model, device, extra, env, cwd: str) -> Served:
    """A Served started in `cwd` (`python -m gdsllm` imports the package there first) with `env`
    on top of this process's environment."""
    old, here = dict(os.environ), os.getcwd()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        return Served(Path(model).resolve(), device=device, extra=extra, startup_s=300.0).__enter__()
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", default=None, help="a copy of the package at another commit")
    ap.add_argument("--trace", default=None, help="directory for the served variants' pass traces")
    a = ap.parse_args()
    from gdsllm import LLM
    from gdsllm.engine.sampling import SamplingParams
    here = str(Path(__file__).resolve().parent.parent)
    # Every variant is up at once: on CUDA each copy of the weights is resident and its KV cache
    # is bounded (4 GiB, 4096 tokens for LLM) so that all of them fit beside each other.
    cuda = a.device.startswith("cuda")
    base = ["--max-batch", "4"] + (["--kv-budget", "4GiB"] if cuda else [])
    variants = {"serve_ahead": (base, here), "serve_sync": (base + ["--no-schedule-ahead"], here)}
    if a.before:
        variants["serve_before"] = (base, str(Path(a.before).resolve()))
    got: dict[str, list[float]] = {k: [] for k in ["llm", *variants]}
    with ExitStack() as stack:
        llm = stack.enter_context(LLM(a.model, device=a.device, max_batch=4, kv_tokens=4096 if cuda else None))
        greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
        srv = {}
        for name, (extra, path) in variants.items():
            env = {"PYTHONPATH": path}
            if a.trace:
                Path(a.trace).mkdir(parents=True, exist_ok=True)
                env["GDSLLM_PASS_TRACE"] = str(Path(a.trace) / f"{name}.jsonl")
            s = served(a.model, a.device, extra, env, path)
            stack.callback(s.__exit__, None, None, None)
            srv[name] = s
        llm.generate(PROMPT, greedy(a.tokens))  # warm-up
        for s in srv.values():
            s.decode(PROMPT, a.tokens)
        for r in range(a.rounds):
            got["llm"].append(per_token(lambda n: llm.generate(PROMPT, greedy(n)), a.tokens))
            for name, s in srv.items():
                got[name].append(per_token(lambda n, s=s: s.decode(PROMPT, n), a.tokens))
            print(json.dumps({"round": r, **{k: round(v[-1], 3) for k, v in got.items()}}), flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    summary = {"device": a.device, "tokens": a.tokens, "rounds": a.rounds,
               "ms_per_token": {k: round(v, 3) for k, v in med.items()},
               "over_llm": {k: round(v / med["llm"], 3) for k, v in med.items() if k != "llm"},
               "per_round_over_llm": {k: [round(x / y, 3) for x, y in zip(got[k], got["llm"])]
                                      for k in variants}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
