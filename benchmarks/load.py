"""Load test: concurrent clients in a bounded loop against a GdsLLM service (loopback only).

    python3 benchmarks/load.py --clients 64 --duration 120            # the figure in docs/RELIABILITY.md
    python3 benchmarks/load.py --endpoint tcp://127.0.0.1:5555 --server-key server.key

Without --endpoint it starts the service itself (gdsllm.service.pipeline.LocalService, CPU backend)
on a tiny random model made in a temp dir (4 blocks, embed and head resident, the blocks streamed
through 2 slots), so it measures the service machinery, not a model. Prints one JSON line:
completed requests, errors by code, hung requests (no reply for --request-timeout), p50 and p99
latency in seconds. Exit status 1 if any request hung or got a malformed reply.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    ap.add_argument("--max-tokens", type=int, default=16, help="new tokens per request, at most")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--endpoint", default=None, help="a running service (default: start one)")
    ap.add_argument("--server-key", default=None, help="its CurveZMQ public key or .key file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from ipc.sockets import is_loopback
    if args.endpoint and not is_loopback(args.endpoint):
        ap.error("loopback or ipc:// endpoints only: this generates load")
    from gdsllm.service.loadgen import run_load

    def go(endpoint):
        return asyncio.run(run_load(endpoint, args.clients, args.duration, seed=args.seed,
                                    max_tokens=args.max_tokens, request_timeout_s=args.request_timeout,
                                    server_key=args.server_key))
    if args.endpoint:
        report = go(args.endpoint)
    else:
        from gdsllm.config import ServiceConfig
        from gdsllm.convert.synth import synth
        from gdsllm.service.pipeline import LocalService
        with tempfile.TemporaryDirectory() as tmp:
            root = synth(Path(tmp) / "tiny", shape="tiny", layers=4, dtype="float32", seed=7)
            sizes = [p.stat().st_size for p in sorted(Path(root).glob("layer_*.bin"))]
            budget = sizes[0] + sizes[-1] + 2 * max(sizes[1:-1])  # embed + head + 2 slots
            config = ServiceConfig(model=root, vram_budget=budget, prefetch_window=2, metrics_port=None)
            with LocalService(config) as svc:
                report = go(svc.endpoint)
    print(json.dumps(report.as_dict()))
    return 1 if report.hung or report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
