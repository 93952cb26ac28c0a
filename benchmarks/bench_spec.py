"""Speculative decoding on the GPU: the 7B float16 model streamed at a budget, without and with a
resident draft, in one run (issue 13). No figures are claimed before it has run.

Run on a GPU machine as root (it drops the page cache), from the repository root:

    PYTHONPATH=. python3 benchmarks/bench_spec.py --work /tmp/gb --budget 8GiB --draft-tokens 4

The target is WORK/llama7b (made by `gdsllm synth --shape llama-7b --dtype float16 --hf-out
WORK/llama7b-hf` if missing; bench_7b.py makes the same). The draft, made once:
- `int4` (default when available): `gdsllm convert WORK/llama7b-hf WORK/draft-int4 --quant int4`,
  the target's own int4 copy (needs the quantized-weights issue merged);
- `truncated`: the target's embedding, first --draft-layers blocks and head, written unit by unit.
A random model's acceptance says nothing about a trained one's; pass --model/--hf for real weights.

For each configuration (no draft; the draft at --draft-tokens K) it starts `gdsllm serve` at the
same --vram-budget (the draft's bytes come out of it), decodes --tokens greedy tokens for each
prompt, cold, and records s/token, and from /metrics the draft tokens, accepted tokens and tokens
per target pass. Greedy tokens with and without the draft are compared. One table on stdout;
raw results in WORK/spec_results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from gdsllm.format.metadata import load_model_meta
from gdsllm.service.benchmark import Served, drop_caches

PROMPTS = ["The history of the printing press begins", "def quicksort(items):",
           "In a small village at the edge of the forest,", "The three laws of thermodynamics are"]


def sh(cmd: list[str], log: Path) -> int:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=f).returncode


def make_target(a) -> None:
    if not (a.model / "metadata.json").exists():
        rc = sh([sys.executable, "-m", "gdsllm", "synth", str(a.model), "--shape", "llama-7b",
                 "--dtype", "float16", "--hf-out", str(a.hf)], a.log)
        if rc:
            raise RuntimeError(f"synth failed; see {a.log}")


def truncated_copy(src: Path, dst: Path, layers: int) -> Path:
    """The embedding, the first `layers` blocks and the head of `src`, one unit in memory at a time."""
    import torch

    from gdsllm.engine.views import unit_tensors
    from gdsllm.format.writer import ModelWriter
    meta = load_model_meta(src)
    p = replace(meta.params, num_hidden_layers=layers)
    with ModelWriter(dst, p, meta.dtype, chat_template=meta.chat_template,
                     source=f"first {layers} blocks of {src}") as w:
        for u in meta.units:
            if u.kind == "block" and u.layer >= layers:
                continue
            buf = torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8)
            w.add_unit({k: v.clone() for k, v in unit_tensors(u, buf).items()})
        if meta.tokenizer_file:
            w.add_file(meta.tokenizer_file, meta.root / meta.tokenizer_file, tokenizer=True)
    return dst


def make_draft(a) -> Path:
    if a.draft_kind in ("auto", "int4"):
        dst = a.work / "draft-int4"
        if (dst / "metadata.json").exists():
            return dst
        rc = sh([sys.executable, "-m", "gdsllm", "convert", str(a.hf), str(dst), "--quant", "int4",
                 "--dtype", "float16"], a.log)
        if rc == 0:
            return dst
        if a.draft_kind == "int4":
            raise RuntimeError(f"int4 conversion failed (is the quantized-weights issue merged?); see {a.log}")
        print("no int4 conversion here: falling back to a truncated draft", flush=True)
    dst = a.work / f"draft-{a.draft_layers}layers"
    return dst if (dst / "metadata.json").exists() else truncated_copy(a.model, dst, a.draft_layers)


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def run_config(a, draft: Path | None) -> dict:
    extra = ["--draft", str(draft), "--draft-tokens", str(a.draft_tokens)] if draft else []
    drop_caches()
    t0 = time.perf_counter()
    with Served(a.model, device="cuda", vram_budget=a.budget, extra=extra, log=a.log) as srv:
        start_s = time.perf_counter() - t0
        port = int(srv.cmd[srv.cmd.index("--metrics-port") + 1])
        runs = []
        for prompt in PROMPTS:
            drop_caches()
            r = srv.decode(prompt, a.tokens)
            runs.append({"prompt": prompt, "tokens": r.tokens, "s_per_token": r.total_s / r.tokens,
                         "decode_s_per_token": r.decode_s_per_token, "token_ids": r.token_ids})
        m = scrape(port)
    res = {"draft": str(draft) if draft else None, "startup_s": start_s, "runs": runs,
           "health": {"resident_units": len(srv.health.resident_units),
                      "streamed_units": srv.health.streamed_units},
           "s_per_token": sum(r["s_per_token"] for r in runs) / len(runs)}
    if draft:
        proposed = m.get("gdsllm_draft_tokens_total", 0.0)
        accepted = m.get("gdsllm_draft_accepted_tokens_total", 0.0)
        passes = m.get("gdsllm_tokens_per_target_pass_count", 0.0)
        res.update(draft_bytes=load_model_meta(draft).total_bytes, proposed=proposed,
                   accepted=accepted, acceptance=accepted / proposed if proposed else 0.0,
                   tokens_per_target_pass=(m.get("gdsllm_tokens_per_target_pass_sum", 0.0) / passes
                                           if passes else 0.0))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="target (default WORK/llama7b)")
    ap.add_argument("--hf", type=Path, default=None, help="its HF copy (default WORK/llama7b-hf)")
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--draft-kind", choices=("auto", "int4", "truncated"), default="auto")
    ap.add_argument("--draft-layers", type=int, default=4)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.model = a.model or a.work / "llama7b"
    a.hf = a.hf or a.work / "llama7b-hf"
    a.log = a.work / "bench_spec.log"
    make_target(a)
    draft = make_draft(a)
    base, spec = run_config(a, None), run_config(a, draft)
    same = [r["token_ids"] == s["token_ids"] for r, s in zip(base["runs"], spec["runs"])]
    out = {"budget": a.budget, "tokens": a.tokens, "draft_tokens": a.draft_tokens,
           "no_draft": base, "draft": spec, "greedy_identical": same}
    (a.work / "spec_results.json").write_text(json.dumps(out, indent=2))
    print(f"\n| {a.model.name} at {a.budget}, {a.tokens} greedy tokens x {len(PROMPTS)} prompts "
          f"| s/token | acceptance | tokens/target pass |")
    print("|---|---|---|---|")
    print(f"| no draft | {base['s_per_token']:.3f} | - | 1 |")
    print(f"| draft {draft.name} ({spec['draft_bytes'] / 1e9:.2f} GB), K={a.draft_tokens} "
          f"| {spec['s_per_token']:.3f} | {spec['acceptance']:.2f} | {spec['tokens_per_target_pass']:.2f} |")
    print(f"greedy tokens identical with and without the draft: {same}")


if __name__ == "__main__":
    main()
