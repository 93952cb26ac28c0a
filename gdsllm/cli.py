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
import sys

from gdsllm.format.metadata import FormatError

COMMANDS = ("convert", "synth", "info", "generate", "run", "serve", "bench", "keygen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdsllm", description="Stream LLM weights from storage to the GPU.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"gdsllm.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"gdsllm.commands.{name}":
                raise
            continue  # not built yet
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FormatError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"gdsllm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `gdsllm info | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"gdsllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
