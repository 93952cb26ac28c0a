"""Speculative decoding: a small resident draft proposes tokens, the target verifies them all in
one pass. Greedy output is token for token the output without a draft; the gain is tokens per
target pass (each pass of a streamed model costs a full read of its streamed weights).

    python examples/speculative.py -m ~/models/big --draft ~/models/small -k 4
    python examples/speculative.py          # the default model drafting for itself: every draft
                                            # token is accepted (a demonstration, not a speed-up)
"""
from __future__ import annotations

import argparse
import time

from gdsllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="target model directory (default: the embedded model)")
    ap.add_argument("--draft", default=None,
                    help="draft model directory, same tokenizer (default: the target itself)")
    ap.add_argument("-k", "--draft-tokens", type=int, default=4, help="tokens drafted per pass (default 4)")
    ap.add_argument("-p", "--prompt", default="The capital of France is")
    ap.add_argument("-n", "--max-tokens", type=int, default=24, help="new tokens (default 24)")
    args = ap.parse_args()

    from gdsllm.engine.llm import resolve
    target = resolve(args.model)
    draft = resolve(args.draft) if args.draft else target
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    with LLM(target, device="cpu") as llm:
        t0 = time.perf_counter()
        plain = llm.generate(args.prompt, params)
        t_plain = time.perf_counter() - t0
    with LLM(target, device="cpu", draft=draft, draft_tokens=args.draft_tokens) as llm:
        t0 = time.perf_counter()
        spec = llm.generate(args.prompt, params)
        t_spec = time.perf_counter() - t0
        st = llm.speculator.stats
    print(f"target {target.name}, draft {draft.name}{' (itself)' if draft == target else ''}, "
          f"k={args.draft_tokens}")
    print(f"without draft: {plain.text!r} ({len(plain.token_ids)} tokens, {t_plain:.2f} s)")
    print(f"with draft:    {spec.text!r} ({len(spec.token_ids)} tokens, {t_spec:.2f} s)")
    print(f"same tokens: {spec.token_ids == plain.token_ids}")
    print(f"drafted {st.draft_tokens}, accepted {st.accepted_tokens} ({st.acceptance:.0%}); "
          f"{st.tokens_per_pass:.2f} tokens per target pass over {st.target_passes} passes")


if __name__ == "__main__":
    main()
