"""`gdsllm run`: an interactive chat in the terminal, through the streaming pipeline.

    gdsllm run -m ~/models/x --vram-budget 2GiB        # starts the service in this process
    gdsllm run --endpoint tcp://127.0.0.1:5555          # talks to a running `gdsllm serve`
    gdsllm run --endpoint http://127.0.0.1:8000         # ... through its HTTP API (--http-port)

Type a message and Enter; `/reset` forgets the conversation, `/quit` or Ctrl-D leaves.
"""
from __future__ import annotations

import sys

from gdsllm.commands.serve import add_service_options, service_config


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="interactive chat (local pipeline or --endpoint)")
    add_service_options(p)
    p.add_argument("--endpoint", default=None, help="use a running server instead of a local pipeline "
                   "(tcp:// or ipc://: ZeroMQ; http://: its OpenAI-compatible API)")
    p.add_argument("--api-key", default=None, help="HTTP API key (default: $GDSLLM_API_KEY)")
    p.add_argument("-s", "--system", default=None, help="system prompt")
    p.add_argument("-n", "--max-tokens", type=int, default=512)
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def chat(client, args, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The REPL over a gdsllm.service.client.Client."""
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit", "/bye"):
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for delta in client.stream(messages=history, max_tokens=args.max_tokens, temperature=args.temp,
                                   top_p=args.top_p, top_k=args.top_k, seed=args.seed):
            reply.append(delta)
            stdout.write(delta)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def run(args) -> int:
    from gdsllm.service.client import Client, ServiceError
    try:
        if args.endpoint:
            from gdsllm.service.http.client import connect
            with connect(args.endpoint, timeout=300.0, api_key=args.api_key) as c:
                chat(c, args)
            return 0
        from gdsllm.service.pipeline import LocalService
        with LocalService(service_config(args, metrics_port=None)) as svc, \
                Client(svc.endpoint, timeout=300.0) as c:
            chat(c, args)
    except (ServiceError, TimeoutError) as e:
        print(f"gdsllm run: error: {e}", file=sys.stderr)
        return 1
    return 0
