"""`gdsllm serve`: the streaming service (coordinator + I/O worker + compute worker) until Ctrl-C.

    gdsllm serve -m ~/models/llama-7b --device cuda --vram-budget 4GiB --prefetch-window 2
    gdsllm serve -m ~/models/llama-7b --draft ~/models/llama-7b-int4 --draft-tokens 4
    gdsllm generate --endpoint tcp://127.0.0.1:5555 -p "Once upon a time"
    gdsllm serve --http-port 8000 --api-key-file keys   # + OpenAI-compatible API, chat page at /

Binds 127.0.0.1 by default; /metrics (Prometheus) on --metrics-host:--metrics-port (0 = a free
port, -1 = off); with --http-port, the OpenAI-compatible HTTP API and the chat page
(gdsllm.service.http) on --http-host:--http-port.
Any other ZeroMQ address needs CurveZMQ keys (`gdsllm keygen`, --curve-secret-key), any other
--http-host an API key (--api-key-file, $GDSLLM_API_KEY), or an explicit --insecure. Limits and supervision: docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse

import os


def add_service_options(p, endpoint_default: str | None = "tcp://127.0.0.1:5555") -> None:
    """The options a service shares with `gdsllm run` / `generate` without --endpoint."""
    p.add_argument("-m", "--model", default=None, help="model directory (default: embedded model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--vram-budget", default=None, metavar="SIZE",
                   help="device memory for weights, e.g. 4GiB (default: everything resident)")
    p.add_argument("--prefetch-window", type=int, default=2, metavar="W",
                   help="streaming slots in rotation, reads in flight at most (default 2)")
    p.add_argument("--io", choices=("direct", "buffered"), default="direct",
                   help="direct: O_DIRECT / cuFile, no page cache (default); buffered: page cache")
    p.add_argument("--require-gds", action="store_true", help="refuse to start without GPUDirect Storage")
    p.add_argument("--no-expert-prefetch", dest="expert_prefetch", action="store_false",
                   help="mixtures of experts: read only the routed experts, no next-layer guesses")
    p.add_argument("--no-schedule-ahead", dest="schedule_ahead", action="store_false",
                   help="everything resident: schedule each decode pass only once the tokens of "
                        "the one before are back (default: the next pass is sent while one runs)")
    p.add_argument("--cpu-compile", action="store_true",
                   help="CPU: decode one sequence through a LLaMA block compiled by torch.compile "
                        "instead of the scripted one (int4 weights): 5-10 s more start-up, not "
                        "always the eager bits")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="sequences per weight pass")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="draft model directory for speculative decoding (same tokenizer; fully "
                        "resident, its bytes taken from --vram-budget), 'ngram' (prompt lookup: "
                        "no model, no bytes), or 'self:N' (the target's own first N layers, "
                        "norm and head: no bytes; those units must be resident)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="tokens the draft proposes per sequence and pass (default 4)")
    p.add_argument("--draft-adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="per sequence, draft only as many of the K tokens as pay off (recent "
                        "acceptance, measured draft / target pass cost; default on; seeded "
                        "sampled requests keep K)")
    p.add_argument("--draft-tree", default=None, metavar="T",
                   help="verify a token tree of T draft nodes (at most K deep) per sequence and "
                        "pass instead of a chain; 'auto': T from the measured draft / target pass "
                        "costs (hundreds when weights stream, a few when resident); default: chains")


def cuda_problem(service: bool = True) -> str | None:
    """Why CUDA cannot be used here, in one line; None when it can. The service also needs CuPy
    (its VRAM arena is shared between processes through CUDA IPC); the single-process engine
    (`service=False`) needs only a CUDA build of torch and a visible GPU."""
    import importlib.util

    import torch
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
    if service and importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'gdsllm[cuda]'): the service shares VRAM through it"
    return None


def pick_device(requested: str | None, service: bool = True) -> str:
    """`--device` as given (cuda checked: ValueError naming the cause), or by default cuda when it
    is usable, else cpu."""
    problem = cuda_problem(service) if requested in (None, "cuda") else None
    if requested is None:
        if problem is not None:
            import logging
            logging.getLogger("gdsllm.commands").info("device cpu (cuda not usable: %s)", problem)
        return "cpu" if problem else "cuda"
    if problem is not None:
        raise ValueError(f"--device cuda: {problem}")
    return requested


def service_config(args, **extra):
    """ServiceConfig from parsed service options (resolving the default model)."""
    from pathlib import Path

    from gdsllm.commands.options import size_option
    from gdsllm.config import ServiceConfig
    from gdsllm.convert.default_model import resolve_model
    budget = size_option(args.vram_budget, "--vram-budget")  # before the model: a typo fails fast
    model = resolve_model(args.model)
    device = pick_device(args.device)
    return ServiceConfig(model=Path(model), device=device, vram_budget=budget,
                         prefetch_window=args.prefetch_window, io_mode=args.io,
                         require_gds=args.require_gds, max_batch=args.max_batch,
                         draft=Path(args.draft).expanduser() if args.draft else None,
                         draft_tokens=args.draft_tokens,
                         draft_adaptive=getattr(args, "draft_adaptive", True),
                         draft_tree=getattr(args, "draft_tree", None),
                         expert_prefetch=getattr(args, "expert_prefetch", True),
                         schedule_ahead=getattr(args, "schedule_ahead", True),
                         cpu_compile=getattr(args, "cpu_compile", False), **extra)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over ZeroMQ (streaming weights from storage)")
    add_service_options(p)
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555)")
    p.add_argument("--metrics-port", type=int, default=9400,
                   help="Prometheus /metrics port (0: a free port, -1: off; default 9400)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics binds (default 127.0.0.1; 0.0.0.0 inside a container)")
    p.add_argument("--max-waiting", type=int, default=4096, metavar="N",
                   help="requests queued behind the batch before new ones are refused (busy, HTTP "
                        "429; default 4096)")
    p.add_argument("--http-port", type=int, default=None, metavar="PORT",
                   help="also serve the OpenAI-compatible HTTP API and the chat page (0: a free port)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="address the HTTP API binds (default 127.0.0.1; 0.0.0.0 inside a container)")
    p.add_argument("--api-key", default=os.environ.get("GDSLLM_API_KEY") or None, metavar="KEY",
                   help="HTTP API key clients must send as 'Authorization: Bearer KEY' (default: "
                        "$GDSLLM_API_KEY, else none; `ps` shows this flag: prefer the variable or "
                        "--api-key-file)")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="HTTP API keys, one per line (# comments): each key is its own caller for "
                        "--max-inflight-per-client")
    p.add_argument("--http-allowed-hosts", default="", metavar="H1,H2",
                   help="Host names the HTTP API answers besides loopback ones and --http-host "
                        "(DNS rebinding guard; '*': any)")
    p.add_argument("--http-allowed-origins", default="", metavar="O1,O2",
                   help="browser Origins (e.g. https://ui.example) allowed besides loopback ones and "
                        "the server's own ('*': any)")
    p.add_argument("--http-header-timeout", type=float, default=10.0, metavar="S",
                   help="close an HTTP connection that sends no complete request head within S "
                        "seconds (default 10)")
    add_reliability_options(p)
    p.set_defaults(func=run)


def add_reliability_options(p) -> None:
    """Security, admission control and supervision settings (docs/RELIABILITY.md)."""
    p.add_argument("--curve-secret-key", default=None, metavar="FILE",
                   help="CurveZMQ secret certificate (`gdsllm keygen`): encrypt and authenticate "
                        "the endpoint; clients need the matching public key")
    p.add_argument("--curve-allow", default=None, metavar="FILE|DIR",
                   help="with --curve-secret-key: serve only the clients whose public key is in this "
                        "certificate file or directory of *.key files (`gdsllm keygen`); others get "
                        "nothing (default: anyone holding the server's public key)")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without --curve-secret-key (ZeroMQ) "
                        "or without an API key (--http-host)")
    p.add_argument("--kv-budget", default=None, metavar="SIZE",
                   help="KV-cache memory for admission control, e.g. 2GiB (default: derived from "
                        "free memory)")
    p.add_argument("--max-inflight-per-client", type=int, default=64, metavar="N",
                   help="requests one client may have in flight; more get Error(busy) (default 64)")
    p.add_argument("--max-pass-tokens", type=int, default=8192, metavar="N",
                   help="new tokens per weight pass; longer prompts are prefilled in chunks "
                        "(default 8192, 0: no limit)")
    p.add_argument("--pass-timeout", type=float, default=300.0, metavar="S",
                   help="watchdog: a pass with no worker reply for S seconds fails and the workers "
                        "are restarted (default 300)")
    p.add_argument("--restart-limit", type=int, default=5, metavar="N",
                   help="worker restarts in a row (no pass completed between) before the service "
                        "gives up and reports degraded (default 5; 0: never restart)")
    p.add_argument("--verify", choices=("first", "always"), default="first",
                   help="checksum each unit on its first load (default) or on every load")
    p.add_argument("--exit-on-degraded", action="store_true",
                   help="exit with status 3 once the service is degraded (workers that keep failing, "
                        "units that keep failing to read), for systemd or compose to restart it")


def reliability_config(args) -> dict:
    """ServiceConfig fields from add_reliability_options' arguments."""
    from pathlib import Path

    from gdsllm.commands.options import size_option
    key = Path(args.curve_secret_key).expanduser() if args.curve_secret_key else None
    allow = Path(args.curve_allow).expanduser() if args.curve_allow else None
    return dict(curve_secret_key=key, curve_allow=allow, insecure=args.insecure,
                exit_on_degraded=args.exit_on_degraded,
                kv_budget=size_option(args.kv_budget, "--kv-budget"),
                max_inflight_per_client=args.max_inflight_per_client,
                max_pass_tokens=args.max_pass_tokens, pass_timeout_s=args.pass_timeout,
                restart_limit=args.restart_limit, verify=args.verify)


def http_options(args):
    """HttpOptions from the --http-* and key arguments (ValueError naming a bad one)."""
    from gdsllm.service.http.server import HttpOptions, read_api_keys
    keys = ((args.api_key,) if args.api_key else ()) + \
        (read_api_keys(args.api_key_file) if args.api_key_file else ())
    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    return HttpOptions(args.http_host, args.http_port, keys, split(args.http_allowed_hosts),
                       split(args.http_allowed_origins), args.http_header_timeout, args.insecure)


def run(args) -> int:
    from gdsllm.service.coordinator import run_coordinator
    from gdsllm.service.worker_set import WorkerStartError
    port = None if args.metrics_port is not None and args.metrics_port < 0 else args.metrics_port
    http = http_options(args) if args.http_port is not None else None  # refused before any loading
    config = service_config(args, endpoint=args.endpoint, metrics_port=port, metrics_host=args.metrics_host,
                            max_waiting=args.max_waiting, **reliability_config(args))
    from gdsllm.service.pipeline import check_endpoint_free
    try:
        check_endpoint_free(config.endpoint)  # before the workers start and HTTP is announced
        if http is not None:
            from gdsllm.service.http.server import run_with_http
            code = run_with_http(config, http)
        else:
            code = run_coordinator(config)
    except (WorkerStartError, OSError) as e:
        raise ValueError(str(e)) from None
    from ipc.sockets import fast_exit
    fast_exit(code)  # all is stopped and closed: the interpreter's teardown would only add seconds
