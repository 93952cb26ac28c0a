"""The Python API, `gdsllm.LLM`: one prompt, a batch, a chat, a stream, and the logits.

    python examples/python_api.py                 # the embedded default model (SmolLM2-135M)
    python examples/python_api.py -m ~/models/x -n 16
"""
from __future__ import annotations

import argparse

from gdsllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GdsLLM model directory (default: the embedded model)")
    ap.add_argument("-n", "--max-tokens", type=int, default=16, help="new tokens per answer (default 16)")
    args = ap.parse_args()

    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    with LLM(args.model, device="cpu") as llm:   # single process; weights read with O_DIRECT
        print(f"model: {llm.meta.root.name}, {llm.meta.num_params / 1e6:.1f}M parameters, "
              f"io path {llm.io_path}")

        out = llm.generate("The capital of France is", greedy)   # one prompt -> Output
        print(f"generate: {out.text!r}")
        print(f"token_ids: {out.token_ids}")
        print(f"finish_reason: {out.finish_reason}")

        outs = llm.generate(["Once upon a time", "1, 2, 3,"], greedy)   # a batch, one pass per step
        for o in outs:
            print(f"batch: {o.text!r}")

        if llm.meta.chat_template:   # chat messages go through the model's template
            chat = llm.generate([{"role": "user", "content": "Name a river."}], greedy)
            print(f"chat: {chat.text!r}")

        sampled = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=1)
        print("stream: ", end="")
        for delta in llm.stream("Here is a story:", sampled):   # text as it is produced
            print(delta, end="", flush=True)
        print()

        logits = llm.logits(out.prompt_token_ids)   # float32 [prompt tokens, vocab], one pass
        print(f"logits: {tuple(logits.shape)}, argmax of the last row {logits[-1].argmax().item()} "
              f"(the first generated token was {out.token_ids[0]})")


if __name__ == "__main__":
    main()
