"""`gdsllm generate`: one completion, streamed to stdout as it is produced.

    gdsllm generate -p "Once upon a time" -n 32            # raw completion, default model
    gdsllm generate -m ~/models/x -p "Hi" --chat --temp 0  # wrapped in the model's chat template
    gdsllm generate -p "Hi" --endpoint tcp://127.0.0.1:5555  # through a running `gdsllm serve`
    gdsllm generate -p "Hi" --endpoint http://127.0.0.1:8000  # through its HTTP API (--http-port)
    gdsllm generate -f prompt.txt -n 64                    # the prompt from a file (-p - : stdin)

Only the generated text goes to stdout; logs, errors and notes (a generation cut short by the
model's context) go to stderr. Without `--endpoint` it starts the same pipeline as `gdsllm serve`
(I/O worker, compute worker, coordinator) for this one request; `--single-process` runs the
engine `gdsllm.LLM` in this process instead (same planner: --vram-budget).
"""
from __future__ import annotations

import sys

from gdsllm.commands.options import sampling_params  # noqa: F401  (also imported from here)


def add_parser(sub) -> None:
    from gdsllm.commands.options import add_prompt_options
    from gdsllm.commands.serve import add_service_options
    p = sub.add_parser("generate", help="generate text for one prompt (stdout: the text only)")
    add_service_options(p)
    add_prompt_options(p, required=True, what="the prompt (raw completion unless --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=None,
                   help="new tokens at most (default 128; less than the model's context)")
    p.add_argument("--temp", type=float, default=None, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely, 0 = off (default 40)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--endpoint", default=None, help="send the request to a running gdsllm serve "
                   "(tcp:// or ipc://: ZeroMQ; http://: its OpenAI-compatible API)")
    p.add_argument("--api-key", default=None, help="HTTP API key (default: $GDSLLM_API_KEY)")
    p.add_argument("--server-key", default=None, metavar="KEY",
                   help="the server's CurveZMQ public key (40 characters, or its .key file)")
    p.add_argument("--single-process", action="store_true",
                   help="run the single-process engine (gdsllm.LLM) instead of the pipeline")
    p.set_defaults(func=run)


def check_max_tokens(max_tokens: int, model) -> None:
    """-n must leave room for a prompt in the model's context (ValueError otherwise)."""
    from gdsllm.format.metadata import load_model_meta
    context = load_model_meta(model).params.max_position_embeddings
    if max_tokens >= context:
        raise ValueError(f"-n {max_tokens}: the model's context holds {context} tokens, the prompt "
                         f"included; ask for fewer new tokens")


def context_note(final, max_tokens: int) -> str | None:
    """The stderr line for a generation that the model's context, not -n, cut short."""
    if final is None or final.finish_reason != "length" or final.completion_tokens >= max_tokens:
        return None
    return (f"stopped at the model's context limit ({final.prompt_tokens} prompt + "
            f"{final.completion_tokens} new tokens), before the {max_tokens} asked for")


def run(args) -> int:
    from gdsllm.commands.options import read_prompt, size_option
    params = sampling_params(args)  # bad values fail here, before any model is loaded
    args.prompt = read_prompt(args)
    if not args.prompt:
        raise ValueError("empty prompt (" + ("-f" if args.file else "-p") + ")")
    if args.endpoint:
        if args.draft:
            raise ValueError("--draft belongs to the server: start `gdsllm serve --draft MODEL`")
        if args.endpoint.startswith(("http://", "https://")):
            return generate_http(args)
        return generate_endpoint(args)
    from gdsllm.commands.serve import pick_device, service_config
    from gdsllm.convert.default_model import resolve_model
    from gdsllm.service.pipeline import check_prompt
    model = resolve_model(args.model)
    check_max_tokens(params.max_tokens, model)
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    # A prompt too long or a --chat without template: said now, not after the workers start.
    check_prompt(model, args.prompt, messages, f"-f {args.file}" if args.file else "-p")
    if args.single_process:
        from gdsllm.engine.llm import LLM
        with LLM(args.model, device=pick_device(args.device, service=False), io=args.io,
                 vram_budget=size_option(args.vram_budget, "--vram-budget"), draft=args.draft,
                 draft_tokens=args.draft_tokens, draft_adaptive=args.draft_adaptive,
                 draft_tree=args.draft_tree, cpu_compile=args.cpu_compile) as llm:
            for delta in llm.stream(messages or args.prompt, params):
                _write(delta)
        _write("\n")
        return 0
    from gdsllm.service.pipeline import generate_once
    config = service_config(args, metrics_port=None)
    given = {"max_tokens": params.max_tokens, "temperature": params.temperature,
             "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed}
    final = generate_once(config, None if messages else args.prompt, given, messages=messages,
                          on_text=_write)
    return _end(final, params.max_tokens)


def generate_endpoint(args) -> int:
    """`gdsllm generate --endpoint URL ...`: stream the text of one request to stdout; a server
    error or an unreachable server is one line on stderr and exit status 1."""
    from gdsllm.service.client import Client, ServiceError
    params = dict(max_tokens=getattr(args, "max_tokens", None), temperature=getattr(args, "temp", None),
                  top_p=getattr(args, "top_p", None), top_k=getattr(args, "top_k", None),
                  seed=getattr(args, "seed", None))
    messages = [{"role": "user", "content": args.prompt}] if getattr(args, "chat", False) else None
    final = None
    try:
        with Client(args.endpoint, timeout=10.0, server_key=getattr(args, "server_key", None)) as c:
            c.health()  # a missing server is a clear error in seconds, not after the long timeout
            c.timeout = getattr(args, "timeout", None) or 300.0  # one pass may take long: no hurry
            for msg in c.stream_messages(None if messages else args.prompt, messages=messages,
                                         **params):
                if getattr(msg, "finish_reason", None) is not None:
                    final = msg
                elif msg.text:
                    _write(msg.text)
    except (ServiceError, TimeoutError) as e:
        print(f"gdsllm generate: error: {e}", file=sys.stderr)
        return 1
    from gdsllm.engine.sampling import SamplingParams
    return _end(final, params["max_tokens"] or SamplingParams().max_tokens)


def generate_http(args) -> int:
    """`gdsllm generate --endpoint http://...`: like the ZeroMQ one, through the HTTP API."""
    from gdsllm.service.client import ServiceError
    from gdsllm.service.http.client import HttpClient
    sp = sampling_params(args)  # the command's defaults, whichever endpoint serves it
    params = dict(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                  seed=sp.seed)
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    try:
        with HttpClient(args.endpoint, timeout=10.0, api_key=getattr(args, "api_key", None)) as c:
            h = c.health()  # a missing server is a clear error in seconds
            if h.status != "ok":
                raise ServiceError(h.status, f"{args.endpoint}: {getattr(h, 'detail', '')}")
            c.timeout = 300.0  # one pass may take long
            for delta in c.stream(None if messages else args.prompt, messages=messages, **params):
                sys.stdout.write(delta)
                sys.stdout.flush()
    except (ServiceError, TimeoutError) as e:
        print(f"gdsllm generate: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def _end(final, max_tokens: int) -> int:
    _write("\n")
    note = context_note(final, max_tokens)
    if note is not None:
        print(f"gdsllm generate: {note}", file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
