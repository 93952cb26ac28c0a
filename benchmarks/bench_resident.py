"""Resident decode at GPU speed (issue 16), one run on a GPU machine, from the repository root:

    PYTHONPATH=. python3 benchmarks/bench_resident.py --work /root/gb --parts synth,llm,hf,service,streamed

Parts: synth (the LLaMA-7B-shaped float16 model and its Hugging Face copy, as bench_7b.py makes
them), llm (`LLM` with everything resident: decode ms/token at batch 1 and aggregate tokens/s at
batch 16, CUDA graphs on and off), hf (transformers' eager `generate`, all resident, the same
prompt length), service (`gdsllm serve` resident: one request, then 16 at once), streamed (`LLM`
at an 8 GiB budget: s/token and the host time per streamed block, graphs on). Decode time per
token is (time for n tokens - time for 1 token) / (n - 1): the prompt's pass is left out.
Results accumulate in WORK/results-resident.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_7b import part_synth, peer, run_parts  # noqa: E402,F401  (part_synth: a part)

PROMPT = "The storage hierarchy of a language model"


def _timed(fn) -> float:
    import torch
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def llm_decode(llm, batch: int, n: int) -> dict:
    """ms/token of one sequence's decode and the batch's aggregate decode tokens/s."""
    from gdsllm import SamplingParams
    prompts = [f"{PROMPT} {i}" for i in range(batch)]
    sp = lambda k: SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)  # noqa: E731
    llm.generate(prompts, sp(n))  # warm-up: graph capture, allocator, Triton
    one = min(_timed(lambda: llm.generate(prompts, sp(1))) for _ in range(3))
    full = min(_timed(lambda: llm.generate(prompts, sp(n))) for _ in range(3))
    step = (full - one) / (n - 1)
    return {"batch": batch, "tokens": n, "ms_per_step": step * 1e3,
            "aggregate_tok_per_s": batch / step, "prefill_s": one}


def part_llm(a, res):
    import torch

    from gdsllm import LLM
    for graphs in (True, False):
        llm = LLM(a.model, device="cuda", cuda_graphs=graphs)
        key = f"llm_resident_graphs_{'on' if graphs else 'off'}"
        res[key] = {f"batch{b}": llm_decode(llm, b, a.tokens) for b in (1, 16)}
        res[key]["capture_s"] = llm.runner.graphs.capture_seconds if graphs else 0.0
        res[key]["weight_bytes"] = llm.meta.total_bytes
        b1 = res[key]["batch1"]["ms_per_step"] / 1e3
        res[key]["effective_weight_GBps"] = llm.meta.total_bytes / b1 / 1e9
        print(key, json.dumps(res[key]), flush=True)
        llm.close()
        del llm
        torch.cuda.empty_cache()


def part_hf(a, res):
    res["transformers_eager"] = peer(a, "transformers", a.tokens)
    print("transformers_eager", json.dumps({k: v for k, v in res["transformers_eager"].items()
                                            if k != "token_ids"}), flush=True)


def part_service(a, res):
    from gdsllm.service.benchmark import Served
    with Served(a.model, device="cuda", log=a.log) as srv:
        srv.decode(PROMPT, 4)
        one, full = srv.decode(PROMPT, 1), srv.decode(PROMPT, a.tokens)
        step = (full.total_s - one.total_s) / (a.tokens - 1)
        n, dt = srv.concurrent(16, a.tokens, PROMPT)
    res["service_resident"] = {"ms_per_token_batch1": step * 1e3,
                               "aggregate_tok_per_s_16_clients": n / dt, "wall_s_16_clients": dt}
    print("service_resident", json.dumps(res["service_resident"]), flush=True)


def part_streamed(a, res):
    """LLM at a budget that streams most blocks: s/token, and the host time spent issuing each
    streamed block's kernels (Runner.run_unit's wall time, the GPU not waited for)."""
    from gdsllm import LLM, SamplingParams
    llm = LLM(a.model, device="cuda", vram_budget=a.budget)
    host: list[float] = []
    run_unit = llm.runner.run_unit
    streamed = set(llm.plan.streamed)

    def timed_run_unit(unit, weights):
        t0 = time.perf_counter()
        run_unit(unit, weights)
        if unit.index in streamed and unit.kind == "block":
            host.append(time.perf_counter() - t0)
    llm.runner.run_unit = timed_run_unit
    sp = lambda k: SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)  # noqa: E731
    llm.generate(PROMPT, sp(2))
    one = _timed(lambda: llm.generate(PROMPT, sp(1)))
    host.clear()
    full = _timed(lambda: llm.generate(PROMPT, sp(a.stream_tokens)))
    res["llm_streamed"] = {"budget": a.budget, "s_per_token": (full - one) / (a.stream_tokens - 1),
                           "streamed_units": len(streamed),
                           "streamed_bytes": sum(llm.meta.units[u].nbytes for u in streamed),
                           "host_ms_per_streamed_block_mean": 1e3 * sum(host) / max(1, len(host)),
                           "host_ms_per_streamed_block_max": 1e3 * max(host, default=0.0)}
    print("llm_streamed", json.dumps(res["llm_streamed"]), flush=True)
    llm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gdsllm-bench"))
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--stream-tokens", type=int, default=4)
    ap.add_argument("--parts", default="synth,llm,hf,service,streamed")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.model, a.hf, a.log = a.work / "model", a.work / "model-hf", a.work / "bench.log"
    run_parts(a, {n[5:]: f for n, f in globals().items() if n.startswith("part_")},
              a.work / "results-resident.json")


if __name__ == "__main__":
    main()
