"""The `gdsllm` command: convert, synth, info, generate, run, serve, bench, keygen.

    gdsllm info                      # the embedded default model (SmolLM2-135M-Instruct)
    gdsllm generate -p "Once upon a time" -n 32
    gdsllm convert model.gguf ~/models/x --dtype float16

Each sub-command lives in its own module under `gdsllm.commands` and exposes `add_parser(sub)`,
which registers its arguments and sets `func`, a callable taking the parsed arguments and
returning the exit status. Errors a user can cause are printed as one line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from gdsllm.format.metadata import FormatError

COMMANDS = ("convert", "synth", "info", "generate", "run", "serve", "bench", "perplexity", "keygen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdsllm", description="Stream LLM weights from storage to the GPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:  # a module that fails to import is a bug: let it raise
        importlib.import_module(f"gdsllm.commands.{name}").add_parser(sub)
    return parser


def _stop_signal(signum, frame) -> None:
    """SIGINT or SIGTERM (`kill`, `timeout`): unwind like Ctrl-C, so every `with` and `finally`
    runs and a local service removes its processes, shared memory and sockets. Repeats are ignored
    from then on (`timeout` signals the process and then its group): an exception raised in the
    middle of that clean-up would cut it short, and the clean-up has its own deadlines."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def user_error(e: BaseException) -> str | None:
    """The one line to print for an error a user can cause (bad input, a missing file or package,
    no GPU, a server that answers with an error or not at all); None for a bug."""
    from gdsllm.service.client import ServiceError
    from gdsllm.service.worker_set import WorkerStartError
    if isinstance(e, ModuleNotFoundError):
        return f"the Python package {e.name!r} is not installed ({e})"
    if isinstance(e, (FormatError, ValueError, OSError, ServiceError, WorkerStartError)):
        return str(e) or type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop_signal)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `gdsllm info | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"gdsllm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = user_error(e)
        if line is None:
            raise
        print(f"gdsllm {args.command}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
