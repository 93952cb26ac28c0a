"""Peers measured beside GdsLLM, each in its own process so its memory is its own.

    python3 benchmarks/peers.py airllm HF_DIR --tokens 8 --prompt-len 16
    python3 benchmarks/peers.py transformers HF_DIR --tokens 32 --prompt-len 16

Prints one JSON line: seconds per token (first token excluded where the peer allows), token ids,
peak RSS. Greedy decoding of a fixed number of tokens over the same prompt ids as GdsLLM's.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def prompt_ids(n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (1, n), generator=g)


def run_transformers(hf_dir: str, tokens: int, prompt_len: int) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16).cuda().eval()
    ids = prompt_ids(prompt_len, model.config.vocab_size).cuda()
    kw = dict(do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens)
    model.generate(ids, **kw)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    ttft = t1 - t0
    return {"s_per_token": ((t2 - t1) - ttft) / (tokens - 1), "ttft_s": ttft,
            "token_ids": out[0, prompt_len:].tolist()}


def run_airllm(hf_dir: str, tokens: int, prompt_len: int) -> dict:
    from airllm import AutoModel
    model = AutoModel.from_pretrained(hf_dir)  # splits the model into per-layer files once
    ids = prompt_ids(prompt_len, model.config.vocab_size).cuda()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, use_cache=True,
                         do_sample=False, return_dict_in_generate=True)
    dt = time.perf_counter() - t0
    seq = out.sequences if hasattr(out, "sequences") else out
    # AirLLM re-reads every layer for the prompt and for each new token alike: total / tokens.
    return {"s_per_token": dt / tokens, "total_s": dt, "token_ids": seq[0, prompt_len:].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["airllm", "transformers"])
    ap.add_argument("hf_dir")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    a = ap.parse_args()
    fn = run_airllm if a.peer == "airllm" else run_transformers
    r = fn(a.hf_dir, a.tokens, a.prompt_len)
    r["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
