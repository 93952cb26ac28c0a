"""`gdsllm bench [-m MODEL] [--device cpu|cuda] [--vram-budget 8GiB] [-n 8]`: on your own machine, the
storage ceiling (raw parallel O_DIRECT read of the model files) beside GdsLLM's decode speed and
streamed GB/s through a real `gdsllm serve`, in one table. Run as root for cold numbers (it drops
the page cache); otherwise the table says the cache was not dropped. The device defaults to cuda
when it is usable, else cpu.
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
    p.set_defaults(func=run)


def run(args) -> int:
    import tempfile

    from gdsllm.commands.serve import pick_device
    from gdsllm.convert.default_model import resolve_model
    from gdsllm.format.metadata import load_model_meta

    args.device = pick_device(args.device)
    if args.tokens < 1:
        raise ValueError(f"-n must be at least 1, got {args.tokens}")
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


def _bench(args, meta, log: Path) -> int:
    from gdsllm.service.benchmark import Served, drop_caches, meminfo_cached, storage_ceiling
    cold = drop_caches()
    bps, _ = storage_ceiling([meta.path(u) for u in meta.units])
    with Served(meta.root, device=args.device, vram_budget=args.vram_budget,
                prefetch_window=args.prefetch_window, log=log) as srv:
        drop_caches()
        c0 = meminfo_cached()
        r = srv.decode("The storage hierarchy of a language model", args.tokens)
        growth = meminfo_cached() - c0
        resident = set(srv.health.resident_units)
        streamed = sum(u.nbytes for u in meta.units if u.name not in resident)
        rss = max(srv.peak_rss().values())
        io_path = srv.health.io_path
    s = r.decode_s_per_token
    print(f"model {meta.root} ({meta.total_bytes / 1e9:.2f} GB), device {args.device}, io {io_path}, "
          f"budget {args.vram_budget or 'all'}, page cache {'dropped' if cold else 'NOT dropped (not root)'}")
    print("| storage ceiling GB/s | s/token | tokens/s | streamed GB/s | bound s/token | page cache growth GB | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {bps / 1e9:.2f} | {s:.3f} | {1 / s:.2f} | {streamed / s / 1e9:.2f} | "
          f"{streamed / bps:.3f} | {growth / 1e9:.2f} | {rss / 1e9:.2f} |")
    return 0
