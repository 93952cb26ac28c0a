"""What several sub-commands share at the command line: the prompt (`-p TEXT`, `-p -` for stdin,
`-f FILE`), sampling values and sizes checked under the flag a user typed, and argparse helpers
that keep `gdsllm --help` from importing torch.

    text = read_prompt(args)                 # -p / -f / stdin
    params = sampling_params(args)           # ValueError names -n, --temp, --top-p, ...
    budget = size_option(args.vram_budget, "--vram-budget")

The engine's errors name its own fields (`max_tokens`, `top_p`): the API's words. The command
line maps them to its flags here, and nowhere else.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

# The dtypes a model can be stored in (gdsllm.format.metadata.DTYPES, which needs torch);
# tests/test_cli.py checks the two agree.
DTYPE_NAMES = ("float16", "bfloat16", "float32")

# SamplingParams field -> the flag that sets it, for `generate` and `run`.
SAMPLING_FLAGS = {"max_tokens": "-n", "temperature": "--temp", "top_p": "--top-p",
                  "top_k": "--top-k", "seed": "--seed"}


def add_prompt_options(p, required: bool, what: str) -> None:
    """`-p/--prompt TEXT` (`-` reads stdin) and `-f/--file FILE`, one of the two."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("-p", "--prompt", default=None,
                   help=f"{what}; '-' reads it from stdin (no length limit)")
    g.add_argument("-f", "--file", default=None, metavar="FILE",
                   help=f"read {what} from a UTF-8 text file")


def read_prompt(args, stdin=None) -> str | None:
    """The prompt text of `-p TEXT`, `-p -` (all of stdin) or `-f FILE`; None when neither was
    given. ValueError (one line, naming the flag) for a file that is missing or not UTF-8 text."""
    if args.file is not None:
        path = Path(args.file).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"-f {path}: no such file") from None
        except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
            raise ValueError(f"-f {path}: not a readable UTF-8 text file ({type(e).__name__})") from None
    if args.prompt == "-":
        stream = stdin if stdin is not None else sys.stdin
        try:
            return stream.read()
        except UnicodeDecodeError:
            raise ValueError("-p -: stdin is not UTF-8 text") from None
    return args.prompt


def flag_error(e: ValueError, flags: dict[str, str]) -> ValueError:
    """`e` with the engine's field names replaced by the command's flags (whole words only)."""
    pattern = r"\b(" + "|".join(map(re.escape, flags)) + r")\b"
    return ValueError(re.sub(pattern, lambda m: flags[m.group(1)], str(e)))


def sampling_params(args):
    """SamplingParams from `generate` / `run` flags (None: the engine's default), validated;
    a bad value is a ValueError naming its flag."""
    from gdsllm.engine.sampling import SamplingParams
    given = {"max_tokens": args.max_tokens, "temperature": args.temp, "top_p": args.top_p,
             "top_k": args.top_k, "seed": args.seed}
    try:
        return SamplingParams(**{k: v for k, v in given.items() if v is not None}).validate()
    except ValueError as e:
        raise flag_error(e, SAMPLING_FLAGS) from None


def size_option(text: str | None, flag: str) -> int | None:
    """Bytes of a size flag such as `--vram-budget 4GiB` (None when not given); a ValueError
    naming the flag otherwise."""
    if text is None:
        return None
    from gdsllm.engine.budget import parse_size
    try:
        n = parse_size(text)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if n <= 0:
        raise ValueError(f"{flag}: a size must be positive, got {text!r}")
    return n


class LazyChoices:
    """argparse `choices` read from a heavy module only when a value is checked or a sub-command's
    help is shown (pair it with a `metavar`, or argparse lists them when the option is added)."""

    def __init__(self, load):
        self.load, self.values = load, None

    def _get(self):
        if self.values is None:
            self.values = tuple(self.load())
        return self.values

    def __contains__(self, value) -> bool:
        return value in self._get()

    def __iter__(self):
        return iter(self._get())
