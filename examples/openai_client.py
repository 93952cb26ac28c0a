"""The official `openai` client against `gdsllm serve --http-port`.

    gdsllm serve --http-port 8000 &            # the embedded default model
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

`-m` names the model to ask for (the model directory's name, as GET /v1/models lists it; default:
the first listed). A key set with `serve --api-key` goes in `--api-key` (or $GDSLLM_API_KEY).
"""
from __future__ import annotations

import argparse
import os
import time

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="model id (default: the first the server lists)")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("GDSLLM_API_KEY", "none"))
    ap.add_argument("-n", "--max-tokens", type=int, default=16, help="new tokens (default 16)")
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")

    out = client.completions.create(model=model, prompt="The capital of France is",
                                    max_tokens=args.max_tokens, temperature=0)
    print(f"completion: {out.choices[0].text!r} (finish {out.choices[0].finish_reason}, "
          f"{out.usage.completion_tokens} tokens)")

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three rivers."}],
        max_tokens=args.max_tokens, temperature=0)
    print(f"chat: {chat.choices[0].message.content!r} ({chat.usage.completion_tokens} tokens)")

    t0 = time.perf_counter()
    first, pieces = None, []
    for chunk in client.completions.create(model=model, prompt="The capital of France is",
                                           max_tokens=args.max_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].text)
    print(f"stream: {''.join(pieces)!r} (first text after {(first or 0) * 1e3:.0f} ms, "
          f"{len(pieces)} chunks in {time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
