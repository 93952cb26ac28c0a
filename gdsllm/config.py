"""The one configuration object of a GdsLLM service, built once from the command line.

    cfg = ServiceConfig(model=Path("~/models/x"), device="cuda", vram_budget=parse_size("8GiB"))

It is frozen and passed down to every process; what is found at run time (the arena layout, the
I/O path actually taken) goes into new objects, never back into the config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gdsllm.engine.budget import DEFAULT_MAX_BATCH, DEFAULT_WINDOW
from gdsllm.engine.scheduler import DEFAULT_MAX_PASS_TOKENS


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of `gdsllm serve` (and of the one-request pipeline behind `gdsllm generate`).

    vram_budget: bytes of device memory for weights (resident units plus streaming slots);
    None means "everything resident". prefetch_window: streaming slots in rotation (reads in
    flight at most). io_mode: "direct" (O_DIRECT / cuFile, no page cache) or "buffered"
    (page-cache reads, an explicit opt-in). draft: a draft model directory for speculative
    decoding (fully resident in the compute worker, its bytes taken from vram_budget);
    draft_tokens: what it proposes per sequence and pass unless a request says otherwise;
    draft_adaptive: K per sequence within [1, draft_tokens] (gdsllm.engine.adaptive_k; seeded
    sampled requests keep draft_tokens, so a seed's tokens do not depend on timings);
    draft_tree: token-tree nodes per sequence and pass (None / 0: chains; "auto": from the
    measured pass costs; gdsllm.engine.tree) unless a request says otherwise.
    """

    model: Path
    device: str = "cpu"
    vram_budget: int | None = None
    prefetch_window: int = DEFAULT_WINDOW
    io_mode: str = "direct"
    require_gds: bool = False
    endpoint: str = "tcp://127.0.0.1:5555"
    metrics_port: int | None = 9400  # None: no /metrics server
    metrics_host: str = "127.0.0.1"
    max_batch: int = DEFAULT_MAX_BATCH  # sequences served by one weight pass
    max_waiting: int = 4096  # requests queued behind the batch before new ones get Error(busy)
    io_threads: int = 8
    startup_timeout_s: float = 120.0
    draft: Path | None = None
    draft_tokens: int = 4
    draft_adaptive: bool = True
    draft_tree: int | str | None = None
    # ---- reliability and security (docs/RELIABILITY.md)
    curve_secret_key: Path | None = None  # ZeroMQ secret certificate: CurveZMQ on the endpoint
    insecure: bool = False  # allow a non-loopback endpoint without CurveZMQ
    kv_budget: int | None = None  # bytes of KV cache handed out; None: derived from free memory
    max_inflight_per_client: int = 64  # requests one client identity may have in flight
    max_pass_tokens: int = DEFAULT_MAX_PASS_TOKENS  # new tokens per weight pass (chunked prefill); 0: no limit
    pass_timeout_s: float = 300.0  # watchdog: a pass with no worker reply for this long fails
    restart_limit: int = 5  # worker restarts in a row (no pass completed between) before giving up
    verify: str = "first"  # checksum each unit's first load ("first") or every load ("always")
    read_retries: int = 3  # a failed unit read is retried this many times (with back-off)
    expert_prefetch: bool = True  # a mixture of experts: read the next layer's guessed experts early
    schedule_ahead: bool = True  # all resident: send the next decode pass before this one's tokens are back
    exit_on_degraded: bool = False  # exit (status 3) once degraded, for systemd / compose to restart
    curve_allow: Path | None = None  # CurveZMQ client public keys allowed: a certificate file or a dir
    cpu_compile: bool = False  # CPU: decode through a torch.compile'd block, not the scripted one

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.io_mode not in ("direct", "buffered"):
            raise ValueError(f"--io must be direct or buffered, got {self.io_mode!r}")
        if not 1 <= self.prefetch_window <= 64:
            raise ValueError(f"--prefetch-window must be 1 to 64, got {self.prefetch_window}")
        if self.vram_budget is not None and self.vram_budget <= 0:
            raise ValueError(f"--vram-budget must be positive, got {self.vram_budget}")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        from gdsllm.engine.sampling import check_draft_tokens  # torch: not at import (the CLI's --help)
        check_draft_tokens(self.draft_tokens)
        from gdsllm.engine.sampling import check_draft_tree
        object.__setattr__(self, "draft_tree", check_draft_tree(self.draft_tree))
        if self.verify not in ("first", "always"):
            raise ValueError(f"--verify must be first or always, got {self.verify!r}")
        if self.kv_budget is not None and self.kv_budget <= 0:
            raise ValueError(f"--kv-budget must be positive, got {self.kv_budget}")
        if self.max_inflight_per_client < 1 or self.max_pass_tokens < 0 or self.restart_limit < 0:
            raise ValueError("--max-inflight-per-client must be >= 1, --max-pass-tokens and "
                             "--restart-limit >= 0")
        from ipc.sockets import is_loopback
        if self.curve_secret_key is None and not self.insecure and not is_loopback(self.endpoint):
            raise ValueError(f"refusing to bind {self.endpoint} without encryption: anyone who can "
                             f"reach it could use the service. Give --curve-secret-key FILE "
                             f"(`gdsllm keygen`), bind 127.0.0.1, or pass --insecure")
        if self.curve_allow is not None and self.curve_secret_key is None:
            raise ValueError("--curve-allow needs --curve-secret-key (the allow-list is of CurveZMQ "
                             "client keys)")
        if self.max_waiting < 1:
            raise ValueError(f"--max-waiting must be at least 1, got {self.max_waiting}")
