"""Stream a model through a small memory budget and print each piece of text as it comes, timed.

With a budget below the model's size, `gdsllm.LLM` keeps what fits resident and reads every other
unit from storage on every step (O_DIRECT on the CPU, KvikIO into VRAM on CUDA), so a model larger
than memory still runs; each step's time is what that reading costs.

    python examples/inference_demo.py                       # the embedded default model, 48 MB
    python examples/inference_demo.py -m ~/models/llama-7b --device cuda --budget 4GiB -n 64
"""
from __future__ import annotations

import argparse
import time

from gdsllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GdsLLM model directory (default: the embedded model)")
    ap.add_argument("-p", "--prompt", default="The capital of France is")
    ap.add_argument("-n", "--max-tokens", type=int, default=24, help="new tokens (default 24)")
    ap.add_argument("--budget", default=None,
                    help="bytes of memory for weights, e.g. 48MB (default: half the model)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = ap.parse_args()

    from gdsllm.engine.llm import resolve
    from gdsllm.format.metadata import load_model_meta
    meta = load_model_meta(resolve(args.model))
    budget = args.budget or max(meta.total_bytes // 2, 2 * max(u.nbytes for u in meta.units))
    t0 = time.perf_counter()
    llm = LLM(meta.root, device=args.device, vram_budget=budget)
    plan = llm.plan
    print(f"model {meta.root.name}: {meta.total_bytes / 1e6:.1f} MB in {len(meta.units)} units; "
          f"budget {budget}; {len(plan.resident_offsets)} units resident "
          f"({plan.resident_bytes / 1e6:.1f} MB), {len(plan.streamed)} streamed every step; "
          f"io path {llm.io_path}; loaded in {time.perf_counter() - t0:.2f} s")

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    read0 = llm.loader.bytes_read
    start = last = time.perf_counter()
    pieces = []
    print(f"{args.prompt}", flush=True)
    for delta in llm.stream(args.prompt, params):
        now = time.perf_counter()
        print(f"  +{(now - last) * 1e3:7.1f} ms  {delta!r}", flush=True)
        pieces.append(delta)
        last = now
    total = time.perf_counter() - start
    streamed = llm.loader.bytes_read - read0
    llm.close()
    print(f"text: {''.join(pieces)!r}")
    print(f"{len(pieces)} pieces in {total:.2f} s; {streamed / 1e6:.1f} MB read from storage "
          f"while generating ({streamed / total / 1e6:.1f} MB/s)")


if __name__ == "__main__":
    main()
