"""`gdsllm generate`: one completion, streamed to stdout as it is produced.

    gdsllm generate -p "Once upon a time" -n 32            # raw completion, default model
    gdsllm generate -m ~/models/x -p "Hi" --chat --temp 0  # wrapped in the model's chat template
    gdsllm generate -p "Hi" --endpoint tcp://127.0.0.1:5555  # through a running `gdsllm serve`

Only the generated text goes to stdout; logs go to stderr. Without `--endpoint` it runs the
single-process engine (`gdsllm.LLM`): one unit resident at a time, streamed from the model dir.
"""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt (stdout: the text only)")
    p.add_argument("-m", "--model", default=None, help="model directory (default: embedded model)")
    p.add_argument("-p", "--prompt", required=True, help="the prompt (raw completion unless --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="new tokens at most (default 128)")
    p.add_argument("--temp", type=float, default=None, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely, 0 = off (default 40)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--io", choices=("direct", "buffered"), default="direct",
                   help="direct: O_DIRECT/cuFile, no page cache (default); buffered: page cache")
    p.add_argument("--endpoint", default=None, help="send the request to a running gdsllm serve")
    p.set_defaults(func=run)


def sampling_params(args):
    from ..sampling import SamplingParams
    given = {"max_tokens": args.max_tokens, "temperature": args.temp, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed}
    return SamplingParams(**{k: v for k, v in given.items() if v is not None}).validate()


def run(args) -> int:
    if not args.prompt:
        raise ValueError("empty prompt (-p)")
    params = sampling_params(args)  # bad values fail here, before any model is loaded
    if args.endpoint:
        from ..client import generate_cli
        return generate_cli(args)
    from ..llm import LLM
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    with LLM(args.model, device=args.device, io=args.io) as llm:
        for delta in llm.stream(prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
