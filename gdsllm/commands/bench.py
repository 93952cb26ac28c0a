"""`gdsllm bench [-m MODEL] [--device cpu|cuda] [--vram-budget 8GiB] [-n 8]`: on your own machine, the
storage ceiling (raw parallel O_DIRECT read of the model files) beside GdsLLM's decode speed and
streamed GB/s through a real `gdsllm serve`, in one table. The page cache is left alone unless
`--drop-caches` is given (root only: it drops the whole machine's page cache, for cold numbers,
and says so on stderr before doing it); the table says which. The device defaults to cuda when
it is usable, else cpu.
"""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="storage ceiling and decode speed on this machine")
    p.add_argument("-m", "--model", default=None, help="model directory (default: embedded model)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="compute device (default: cuda if usable, else cpu)")
    p.add_argument("--vram-budget", default=None, metavar="SIZE",
                   help="device memory for weights, e.g. 8GiB (default: everything resident)")
    p.add_argument("--prefetch-window", type=int, default=4, metavar="W",
                   help="streaming slots in rotation (default 4)")
    p.add_argument("-n", "--tokens", type=int, default=8, help="tokens to decode (default 8)")
    p.add_argument("--drop-caches", action="store_true",
                   help="drop the WHOLE MACHINE's page cache before each measurement, for cold "
                        "numbers (root only; default: leave the page cache alone)")
    p.set_defaults(func=run)


def run(args) -> int:
    import tempfile

    from gdsllm.commands.serve import pick_device
    from gdsllm.convert.default_model import resolve_model
    from gdsllm.format.metadata import load_model_meta

    from gdsllm.commands.options import size_option
    args.device = pick_device(args.device)
    if args.tokens < 1:
        raise ValueError(f"-n must be at least 1, got {args.tokens}")
    size_option(args.vram_budget, "--vram-budget")  # a typo fails here, not in the server's log
    meta = load_model_meta(resolve_model(args.model))
    with tempfile.TemporaryDirectory(prefix="gdsllm-bench-") as tmp:
        log = Path(tmp) / "serve.log"
        try:
            return _bench(args, meta, log)
        except RuntimeError as e:  # `gdsllm serve` exited while starting: its own error says why
            raise ValueError(_serve_error(log) or str(e)) from None


def _serve_error(log: Path) -> str | None:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ": error: " in ln]
    return lines[-1].split(": error: ", 1)[1] if lines else None


def _drop_caches(args) -> bool:
    """With --drop-caches: say so on stderr, then drop the page cache (ValueError where that is
    not allowed). Without it: nothing, False."""
    if not args.drop_caches:
        return False
    import sys

    from gdsllm.service.benchmark import drop_caches
    print("gdsllm bench: dropping the whole machine's page cache (--drop-caches)", file=sys.stderr)
    if not drop_caches():
        raise ValueError("--drop-caches: cannot write /proc/sys/vm/drop_caches (needs root)")
    return True


def _bench(args, meta, log: Path) -> int:
    from gdsllm.service.benchmark import Served, meminfo_cached, storage_ceiling
    cold = _drop_caches(args)
    bps, _ = storage_ceiling([meta.path(u) for u in meta.units])
    with Served(meta.root, device=args.device, vram_budget=args.vram_budget,
                prefetch_window=args.prefetch_window, log=log) as srv:
        _drop_caches(args)
        c0 = meminfo_cached()
        r = srv.decode("The storage hierarchy of a language model", args.tokens)
        growth = meminfo_cached() - c0
        resident = set(srv.health.resident_units)
        streamed = sum(u.nbytes for u in meta.units if u.name not in resident)
        rss = max(srv.peak_rss().values())
        io_path = srv.health.io_path
    s = r.decode_s_per_token
    print(f"model {meta.root} ({meta.total_bytes / 1e9:.2f} GB), device {args.device}, io {io_path}, "
          f"budget {args.vram_budget or 'all'}, page cache {'dropped' if cold else 'kept (warm; --drop-caches for cold numbers)'}")
    print("| storage ceiling GB/s | s/token | tokens/s | streamed GB/s | bound s/token | page cache growth GB | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {bps / 1e9:.2f} | {s:.3f} | {1 / s:.2f} | {streamed / s / 1e9:.2f} | "
          f"{streamed / bps:.3f} | {growth / 1e9:.2f} | {rss / 1e9:.2f} |")
    return 0
