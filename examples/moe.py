"""A mixture of experts: only the experts the router picks are read, into a few expert slots.

Without -m, a tiny random Mixtral-shaped model (8 experts per layer, top-2, int4 experts) is
written to a temporary directory first (`gdsllm synth --shape tiny-moe`). The budget keeps the
dense units resident and leaves room for a few experts: the rest are read when routed.

    python examples/moe.py
    python examples/moe.py -m ~/models/mixtral --device cuda --budget 8GiB
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gdsllm import LLM, SamplingParams
from gdsllm.format.metadata import load_model_meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None,
                    help="a mixture-of-experts model directory (default: a tiny synthetic one)")
    ap.add_argument("-p", "--prompt", default="hello world")
    ap.add_argument("-n", "--max-tokens", type=int, default=12, help="new tokens (default 12)")
    ap.add_argument("--budget", default=None,
                    help="bytes for weights (default: the dense units and 4 experts' worth)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="gdsllm-moe-") as tmp:
        model = args.model
        if model is None:
            from gdsllm.convert.synth import synth
            model = synth(Path(tmp) / "tiny-moe", "tiny-moe", dtype="float32", quant="int4",
                          group_size=32)
        meta = load_model_meta(Path(model).expanduser())
        p = meta.params
        if not p.num_experts:
            raise SystemExit(f"moe.py: {meta.root} is not a mixture of experts ({meta.architecture})")
        experts = [u for u in meta.units if u.kind == "expert"]
        dense = sum(u.nbytes for u in meta.units if u.kind != "expert")
        budget = args.budget or dense + 4 * max(u.nbytes for u in experts)
        print(f"model {meta.root.name} ({meta.architecture}): {p.num_hidden_layers} layers, "
              f"{p.num_experts} experts each, top-{p.num_experts_per_tok}; {len(experts)} expert "
              f"units, {sum(u.nbytes for u in experts) / 1e6:.2f} MB of experts, "
              f"{dense / 1e6:.2f} MB dense; budget {budget}")
        with LLM(meta.root, device=args.device, vram_budget=budget) as llm:
            out = llm.generate(args.prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                                           ignore_eos=True))
            st = llm.experts.stats()
        print(f"text: {out.text!r}")
        print(f"token_ids: {out.token_ids}")
        print(f"expert slots {st['expert_slots']}; routed {st['expert_routed']}, read "
              f"{st['expert_loads']} ({st['expert_bytes_read'] / 1e6:.2f} MB), cache hits "
              f"{st['expert_hits']}, evictions {st['expert_evictions']}")


if __name__ == "__main__":
    main()
