"""`gdsllm run`: an interactive chat in the terminal, through the streaming pipeline.

    gdsllm run -m ~/models/x --vram-budget 2GiB        # starts the service in this process
    gdsllm run --endpoint tcp://127.0.0.1:5555          # talks to a running `gdsllm serve`
    gdsllm run --endpoint http://127.0.0.1:8000         # ... through its HTTP API (--http-port)

Type a message and Enter; `/help` lists the commands, `/reset` forgets the conversation, `/quit`
or Ctrl-D leaves. The replies go to stdout; notes (a reset, a reply cut short by the model's
context, an error) to stderr.
"""
from __future__ import annotations

import sys

from gdsllm.commands.serve import add_service_options, service_config

HELP = """commands:
  /help    this list
  /reset   forget the conversation (the system prompt stays)
  /quit    leave (also /exit, /bye, Ctrl-D)"""
QUIT = ("/quit", "/exit", "/bye")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="interactive chat (local pipeline or --endpoint)")
    add_service_options(p)
    p.add_argument("--endpoint", default=None, help="use a running server instead of a local pipeline "
                   "(tcp:// or ipc://: ZeroMQ; http://: its OpenAI-compatible API)")
    p.add_argument("--server-key", default=None, metavar="KEY",
                   help="the server's CurveZMQ public key (40 characters, or its .key file)")
    p.add_argument("--api-key", default=None, help="HTTP API key (default: $GDSLLM_API_KEY)")
    p.add_argument("-s", "--system", default=None, help="system prompt")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="new tokens per reply at most (default 512)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely, 0 = off (default 40)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=run)


def chat(client, args, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr) -> None:
    """The REPL over a gdsllm.service.client.Client."""
    from gdsllm.service.client import ServiceError
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    if interactive:
        print("/help for the commands", file=stderr)
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in QUIT:
            break
        line = line.rstrip("\n")
        command = line.strip()
        if not command:
            continue
        if command in ("/help", "/?"):
            print(HELP, file=stderr)
            continue
        if command == "/reset":
            history = history[:1] if args.system else []
            print("conversation reset" + (" (system prompt kept)" if args.system else ""), file=stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; /help lists the commands", file=stderr)
            continue
        history.append({"role": "user", "content": line})
        reply, final = [], []
        try:
            for delta in _reply(client, history, args, final):
                reply.append(delta)
                stdout.write(delta)
                stdout.flush()
        except ServiceError as e:
            if e.code != "bad_request" and getattr(e, "status", None) != 400:
                raise
            history.pop()  # e.g. the conversation outgrew the context: the turn is not kept
            print(f"error: {e.message}" + ("; /reset starts over" if len(history) > 1 else ""),
                  file=stderr)
            continue
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
        if final and final[0].finish_reason == "length" and final[0].completion_tokens < args.max_tokens:
            print("(the reply stopped at the model's context limit; /reset starts over)", file=stderr)


def _reply(client, history, args, final: list):
    """Text deltas of the assistant's reply; the Final lands in `final` where the client gives
    one (the ZeroMQ Client's stream_messages; the HTTP client streams text only)."""
    params = dict(messages=history, max_tokens=args.max_tokens, temperature=args.temp,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if not hasattr(client, "stream_messages"):
        yield from client.stream(**params)
        return
    for msg in client.stream_messages(**params):
        if getattr(msg, "finish_reason", None) is not None:
            final.append(msg)
        elif msg.text:
            yield msg.text


def run(args) -> int:
    from gdsllm.service.client import Client
    if args.endpoint:
        from gdsllm.service.http.client import connect
        with connect(args.endpoint, timeout=10.0, api_key=args.api_key,
                     server_key=getattr(args, "server_key", None)) as c:
            c.health()  # a missing server is a clear error in seconds, not at the first message
            c.timeout = 300.0  # one pass may take long: no hurry
            chat(c, args)
        return 0
    from gdsllm.service.pipeline import LocalService
    with LocalService(service_config(args, metrics_port=None)) as svc, \
            Client(svc.endpoint, timeout=300.0) as c:
        chat(c, args)
    return 0
