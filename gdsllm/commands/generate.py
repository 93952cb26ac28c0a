"""`gdsllm generate`: one completion, streamed to stdout as it is produced.

    gdsllm generate -p "Once upon a time" -n 32            # raw completion, default model
    gdsllm generate -m ~/models/x -p "Hi" --chat --temp 0  # wrapped in the model's chat template
    gdsllm generate -p "Hi" --endpoint tcp://127.0.0.1:5555  # through a running `gdsllm serve`
    gdsllm generate -p "Hi" --endpoint http://127.0.0.1:8000  # through its HTTP API (--http-port)

Only the generated text goes to stdout; logs go to stderr. Without `--endpoint` it starts the
same pipeline as `gdsllm serve` (I/O worker, compute worker, coordinator) for this one request;
`--single-process` runs the reference engine `gdsllm.LLM` instead (one unit at a time, one buffer).
"""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from gdsllm.commands.serve import add_service_options
    p = sub.add_parser("generate", help="generate text for one prompt (stdout: the text only)")
    add_service_options(p)
    p.add_argument("-p", "--prompt", required=True, help="the prompt (raw completion unless --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="new tokens at most (default 128)")
    p.add_argument("--temp", type=float, default=None, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely, 0 = off (default 40)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--endpoint", default=None, help="send the request to a running gdsllm serve "
                   "(tcp:// or ipc://: ZeroMQ; http://: its OpenAI-compatible API)")
    p.add_argument("--api-key", default=None, help="HTTP API key (default: $GDSLLM_API_KEY)")
    p.add_argument("--single-process", action="store_true",
                   help="run the single-process reference engine instead of the pipeline")
    p.set_defaults(func=run)


def sampling_params(args):
    from gdsllm.engine.sampling import SamplingParams
    given = {"max_tokens": args.max_tokens, "temperature": args.temp, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed}
    return SamplingParams(**{k: v for k, v in given.items() if v is not None}).validate()


def run(args) -> int:
    if not args.prompt:
        raise ValueError("empty prompt (-p)")
    params = sampling_params(args)  # bad values fail here, before any model is loaded
    if args.endpoint:
        if args.draft:
            raise ValueError("--draft belongs to the server: start `gdsllm serve --draft MODEL`")
        if args.endpoint.startswith(("http://", "https://")):
            from gdsllm.service.http.client import generate_cli
        else:
            from gdsllm.service.client import generate_cli
        return generate_cli(args)
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    if args.single_process:
        from gdsllm.engine.llm import LLM
        with LLM(args.model, device=args.device or "cpu", io=args.io, draft=args.draft,
                 draft_tokens=args.draft_tokens) as llm:
            for delta in llm.stream(messages or args.prompt, params):
                _write(delta)
    else:
        from gdsllm.service.pipeline import generate_once
        from gdsllm.commands.serve import service_config
        config = service_config(args, metrics_port=None)
        given = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                 "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed}
        generate_once(config, None if messages else args.prompt, given, messages=messages,
                      on_text=_write)
    _write("\n")
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
