"""`gdsllm run`: an interactive chat in the terminal, through the streaming pipeline.

    gdsllm run -m ~/models/x --vram-budget 2GiB        # starts the service in this process
    gdsllm run --endpoint tcp://127.0.0.1:5555          # talks to a running `gdsllm serve`
    gdsllm run --endpoint http://127.0.0.1:8000         # ... through its HTTP API (--http-port)

    gdsllm run -f question.txt                          # the first message from a file (-p - : stdin)

Type a message and Enter; `/help` lists the commands, `/reset` forgets the conversation, `/quit`
or Ctrl-D leaves. Ctrl-C during an answer stops that answer only (the request is cancelled, the
conversation keeps what was said); at the prompt it drops the line typed so far, and a second
Ctrl-C in a row leaves. The replies go to stdout; notes (a reset, a reply cut short by the
model's context, an error) to stderr.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from gdsllm.commands.serve import add_service_options, service_config

HELP = """commands:
  /help    this list
  /reset   forget the conversation (the system prompt stays)
  /quit    leave (also /exit, /bye, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C during an answer stops it; at the prompt it drops the line typed so far."""
QUIT = ("/quit", "/exit", "/bye")
AGAIN = "(Ctrl-C again, Ctrl-D or /quit leaves)"
STOPPED = "(answer stopped)"


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="interactive chat (local pipeline or --endpoint)")
    add_service_options(p)
    p.add_argument("--endpoint", default=None, help="use a running server instead of a local pipeline "
                   "(tcp:// or ipc://: ZeroMQ; http://: its OpenAI-compatible API)")
    p.add_argument("--server-key", default=None, metavar="KEY",
                   help="the server's CurveZMQ public key (40 characters, or its .key file)")
    p.add_argument("--api-key", default=None, help="HTTP API key (default: $GDSLLM_API_KEY)")
    p.add_argument("-s", "--system", default=None, help="system prompt")
    from gdsllm.commands.options import add_prompt_options
    add_prompt_options(p, required=False, what="a first message, answered before the prompt")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="new tokens per reply at most (default 512)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely, 0 = off (default 40)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.set_defaults(func=run)


def chat(client, args, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, first=None) -> None:
    """The REPL over a gdsllm.service.client.Client (or the HTTP client); `first`: a message
    answered before the first prompt. Ctrl-C (KeyboardInterrupt) is handled as the module
    docstring says; run it under `interruptible()` so that every Ctrl-C raises one."""
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    if interactive:
        print("/help for the commands", file=stderr)
    interrupted = False  # the last thing that happened at the prompt was a Ctrl-C
    while True:
        if first is not None:
            line, first = first, None
        else:
            try:
                if interactive:
                    stdout.write(">>> ")
                    stdout.flush()
                line = stdin.readline()
            except KeyboardInterrupt:  # the terminal has dropped the half-typed line
                stdout.write("\n")
                stdout.flush()
                if interrupted:
                    return
                interrupted = True
                print(AGAIN, file=stderr)
                continue
        interrupted = False
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
        _turn(client, args, history, line, stdout, stderr)


def _turn(client, args, history: list, line: str, stdout, stderr) -> None:
    """One exchange: the answer streamed to stdout and added to `history`. Ctrl-C stops it (the
    request is cancelled; what was said so far stays in the conversation)."""
    from gdsllm.service.client import ServiceError
    history.append({"role": "user", "content": line})
    reply, final = [], []
    try:
        with contextlib.closing(_reply(client, history, args, final)) as deltas:
            for delta in deltas:
                reply.append(delta)
                stdout.write(delta)
                stdout.flush()
    except ServiceError as e:
        if e.code != "bad_request" and getattr(e, "status", None) != 400:
            raise
        history.pop()  # e.g. the conversation outgrew the context: the turn is not kept
        print(f"error: {e.message}" + ("; /reset starts over" if len(history) > 1 else ""),
              file=stderr)
        return
    except KeyboardInterrupt:  # closing the stream above has cancelled the request
        stdout.write("\n")
        stdout.flush()
        print(STOPPED, file=stderr)
        if reply:
            history.append({"role": "assistant", "content": "".join(reply)})
        else:
            history.pop()  # nothing was answered: the question is dropped with its answer
        return
    stdout.write("\n")
    history.append({"role": "assistant", "content": "".join(reply)})
    if final and final[0].finish_reason == "length" and final[0].completion_tokens < args.max_tokens:
        print("(the reply stopped at the model's context limit; /reset starts over)", file=stderr)


@contextlib.contextmanager
def interruptible():
    """Every Ctrl-C raises KeyboardInterrupt while inside (`gdsllm`'s own handler turns the first
    one into leaving and ignores the rest); the previous handler comes back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _reply(client, history, args, final: list):
    """Text deltas of the assistant's reply; the Final lands in `final` where the client gives
    one (the ZeroMQ Client's stream_messages; the HTTP client streams text only)."""
    params = dict(messages=history, max_tokens=args.max_tokens, temperature=args.temp,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if not hasattr(client, "stream_messages"):
        with contextlib.closing(client.stream(**params)) as deltas:  # closed: the HTTP request ends
            yield from deltas
        return
    with contextlib.closing(client.stream_messages(**params)) as messages:  # closed early: Cancel
        for msg in messages:
            if getattr(msg, "finish_reason", None) is not None:
                final.append(msg)
            elif msg.text:
                yield msg.text


def run(args) -> int:
    from gdsllm.commands.options import read_prompt, sampling_params
    from gdsllm.service.client import Client
    sampling_params(args)  # a bad -n, --temp, ... fails now, not at the first message
    first = read_prompt(args)
    if args.endpoint:
        from gdsllm.service.http.client import connect
        with connect(args.endpoint, timeout=10.0, api_key=args.api_key,
                     server_key=getattr(args, "server_key", None)) as c:
            c.health()  # a missing server is a clear error in seconds, not at the first message
            c.timeout = 300.0  # one pass may take long: no hurry
            with interruptible():
                chat(c, args, first=first)
        return 0
    from gdsllm.service.pipeline import LocalService, check_prompt
    config = service_config(args, metrics_port=None)
    # No chat template, or a first message too long: said now, not after the workers start.
    check_prompt(config.model, None, [{"role": "user", "content": first or "hi"}],
                 "gdsllm run chats" if first is None else "the first message")
    with LocalService(config) as svc, \
            Client(svc.endpoint, timeout=300.0) as c:
        with interruptible():
            chat(c, args, first=first)
    return 0
