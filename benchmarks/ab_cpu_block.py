"""`LLM` decode of the default model with every block eager against the block as one scripted
call (gdsllm.models.cpu_compiled), interleaved rounds in one process (issue 25).

    PYTHONPATH=. python3 benchmarks/ab_cpu_block.py --rounds 8

Both LLMs are made first (GDSLLM_CPU_COMPILE=0 for the eager one: the Runner reads it when it is
made), then each round decodes --tokens greedy tokens of bench_cpu.py's chat prompt with each;
the rate is (deltas - 1) / (last text delta's time - first one's), as bench_cpu.py's `LLM` row
counts it. Prints each round, the medians, the per-round ratios and whether both gave the same
text.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

PROMPT = "Write a long story about a dragon who learns to cook."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from gdsllm import LLM, SamplingParams
    llms = {}
    for mode in ("eager", "script"):
        os.environ["GDSLLM_CPU_COMPILE"] = "0" if mode == "eager" else "1"
        llms[mode] = LLM()
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    msg = [{"role": "user", "content": PROMPT}]

    def rate(llm) -> tuple[float, str]:
        ts, text = [], []
        for delta in llm.stream(msg, sp):
            ts.append(time.perf_counter())
            text.append(delta)
        return (len(ts) - 1) / (ts[-1] - ts[0]), "".join(text)

    same = len({rate(llm)[1] for llm in llms.values()}) == 1  # also makes the host copies
    res: dict[str, list[float]] = {m: [] for m in llms}
    for r in range(a.rounds):
        for m, llm in llms.items():
            res[m].append(rate(llm)[0])
        print(r, {m: round(v[-1], 1) for m, v in res.items()}, "load", os.getloadavg()[0], flush=True)
    ratios = sorted(s / e for s, e in zip(res["script"], res["eager"]))
    for m, v in res.items():
        print(f"{m}: median {statistics.median(v):.1f} tok/s")
    print(f"script / eager per round: median {statistics.median(ratios):.3f}, "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}; same text: {same}; blocks scripted: "
          f"{llms['script'].runner.compiled.calls}, eager: {llms['eager'].runner.compiled.calls}")
    for llm in llms.values():
        llm.close()


if __name__ == "__main__":
    main()
