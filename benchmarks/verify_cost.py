"""The cost of `gdsllm serve --verify always` (every streamed unit checksummed where it landed)
against the default `--verify first`, on the same model, budget and machine, in one run.

    PYTHONPATH=. python3 benchmarks/verify_cost.py -m /tmp/gb/llama7b --vram-budget 8GiB --tokens 8
    PYTHONPATH=. python3 benchmarks/verify_cost.py --synth llama-7b --work /tmp/gb   # makes the model once

Prints one JSON line: for each mode, decode seconds per token (the first token excluded, after a
warm-up request that also does every `--verify first` checksum) and the units streamed per pass;
the checksum alone over one streamed unit where it lands (device or host), in GB/s; and the
ratio always/first. The page cache is dropped before each mode where allowed (root), so both read
cold. Run it on the GPU machine; docs/RELIABILITY.md says where its figure goes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def checksum_gbps(model: Path, device: str, repeats: int = 5) -> float:
    """GB/s of gdsllm.format.metadata.checksum over the largest unit, resident on `device`."""
    import numpy as np
    import torch

    from gdsllm.format.metadata import checksum, load_model_meta
    meta = load_model_meta(model)
    unit = max(meta.units, key=lambda u: u.nbytes)
    buf = torch.from_numpy(np.fromfile(meta.path(unit), dtype=np.uint8)).to(device)
    checksum(buf)  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    for _ in range(repeats):
        checksum(buf)  # .item() inside: synchronous
    return unit.nbytes * repeats / (time.perf_counter() - t0) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--synth", default=None, help="make a model of this synth shape (e.g. llama-7b)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gdsllm-verify"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vram-budget", default="8GiB")
    ap.add_argument("--prefetch-window", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args(argv)
    from gdsllm.service.benchmark import Served, drop_caches
    model = args.model
    if model is None:
        if not args.synth:
            ap.error("give -m MODEL or --synth SHAPE")
        from gdsllm.convert.synth import synth
        model = args.work / args.synth
        if not (model / "metadata.json").exists():
            synth(model, shape=args.synth, dtype="float16" if args.device == "cuda" else "float32")
    out: dict = {"model": str(model), "device": args.device, "vram_budget": args.vram_budget}
    for mode in ("first", "always"):
        cold = drop_caches()
        with Served(model, device=args.device, vram_budget=args.vram_budget,
                    prefetch_window=args.prefetch_window, extra=["--verify", mode]) as srv:
            srv.decode("Once upon a time", n=2)  # warm-up; with --verify first, every checksum
            r = srv.decode("Once upon a time", n=args.tokens)
            streamed = srv.health.streamed_units
        out[mode] = {"s_per_token": round(r.decode_s_per_token, 4), "cold": cold,
                     "streamed_units": streamed}
    out["always_over_first"] = round(out["always"]["s_per_token"] / out["first"]["s_per_token"], 3)
    out["checksum_gb_per_s"] = round(checksum_gbps(model, args.device), 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
