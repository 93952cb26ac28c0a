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

COMMANDS = ("convert", "synth", "info", "generate", "run", "serve", "bench", "perplexity", "keygen")


# Commands whose log (INFO) is what the user runs them for; the others say only warnings and
# errors unless -v is given (their output is the text, the table, the figure).
LOGGING_COMMANDS = ("serve",)
VERBOSE_HELP = "more on stderr: -v the progress log (INFO), -vv debug"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command. Command modules import only the standard library at the
    top and in `add_parser` (torch and the engine on use), so `gdsllm --help` is quick."""
    parser = argparse.ArgumentParser(prog="gdsllm", description="Stream LLM weights from storage to the GPU.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:  # a module that fails to import is a bug: let it raise
        importlib.import_module(f"gdsllm.commands.{name}").add_parser(sub)
    for p in sub.choices.values():  # `gdsllm generate -v ...` as well as `gdsllm -v generate ...`
        if not any("-v" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                           help=VERBOSE_HELP)
    return parser


def log_level(command: str, verbose: int) -> int:
    if verbose >= 2:
        return logging.DEBUG
    if verbose == 1 or command in LOGGING_COMMANDS:
        return logging.INFO
    return logging.WARNING


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
    if isinstance(e, (ValueError, OSError, ServiceError, WorkerStartError)):  # FormatError too
        return str(e) or type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=log_level(args.command, args.verbose), stream=sys.stderr,
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
