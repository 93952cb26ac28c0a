"""`gdsllm perplexity -m MODEL -f TEXT [--ctx 512] [--device cpu|cuda] [--second-half]`: the
perplexity of a model over a text file (definition in gdsllm.engine.perplexity), the figure
llama.cpp users compare quantizations by (`--second-half`: of the tokens llama-perplexity
scores). The last line of stdout is `perplexity: P over N tokens`; stderr shows
the windows done and tokens/s as they go (on a terminal) and a summary line at the end.

    gdsllm perplexity -m ~/models/x.int4 -f /usr/share/common-licenses/GPL-3 --ctx 512
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model over a text file")
    p.add_argument("-m", "--model", default=None, help="model directory (default: embedded model)")
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--second-half", action="store_true",
                   help="score only the tokens after the middle of each window, as "
                   "llama-perplexity does (the same tokens, to compare its figure)")
    p.set_defaults(func=run)


def run(args) -> int:
    from gdsllm.engine.llm import LLM
    from gdsllm.engine.perplexity import perplexity
    from gdsllm.service.progress import CountProgress
    path = Path(args.file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e.__class__.__name__})") from None
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be at least 1, got {args.max_windows}")
    with LLM(args.model, device=args.device) as llm:
        bar = CountProgress("window", args.ctx)
        try:
            ppl, n = perplexity(llm, text, args.ctx, args.max_windows, where=str(path), progress=bar,
                                second_half=args.second_half)
        finally:
            summary = bar.close()
    print(f"gdsllm perplexity: {summary}", file=sys.stderr)
    print(f"perplexity: {ppl:.4f} over {n} tokens")
    return 0
