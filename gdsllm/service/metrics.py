"""The service's Prometheus metrics, declared in one place and exported by the coordinator only.

    m = ServiceMetrics()                      # its own registry: many can live in one process
    m.set_build_info("0.1.0", "cpu", "posix")
    server = m.start_http("127.0.0.1", 9400)  # GET http://127.0.0.1:9400/metrics; port 0: free port
    m.observe_load(nbytes, seconds, "posix")  # per unit read by the I/O worker
    ...
    server.shutdown(); server.server_close()

Workers report timings in their replies (Loaded, Done, PassResult); the coordinator feeds them
here, so no multiprocess mode is needed. Names follow Prometheus' rules: prefix `gdsllm_`, base
units (seconds, bytes), `_total` on counters. `monitoring/grafana/dashboards/gdsllm.json` queries
these names: rename one and the dashboard test fails.
"""
from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import start_http_server

from gdsllm.format.storage import IO_PATHS

FINISH_REASONS = ("stop", "length", "cancelled", "error")

# A layer load is a few ms (a 135M model's block from a warm NVMe) to seconds (a 70B block from a
# virtio disk); a layer's compute is sub-ms on a GPU to a second on a CPU.
LAYER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Token latencies: ms when everything is resident, tens of seconds when a big model streams
# every pass from a slow disk (AirLLM-class setups: ~10 s/token).
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 20.0, 30.0, 60.0, 120.0)
# Tokens a sequence gains from one target pass that verified its draft: 1 (all rejected) to K + 1.
SPEC_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 65)
# Draft tokens or tree nodes per pass, up to the largest tree (4096 nodes).
TREE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# HTTP requests: ms for /health and refusals, up to a whole generation for a non-streamed answer.
HTTP_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1800.0, 3600.0)


class ServiceMetrics:
    """Every metric of one service, in its own registry (never the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.port: int | None = None  # the bound /metrics port once start_http ran
        self.build_info = Info("gdsllm_build", "Version, compute backend and I/O path of this service",
                               registry=r)
        self.storage_read_bytes = Counter(
            "gdsllm_storage_read_bytes", "Weight bytes read from storage, by I/O path "
            "(gds, compat, posix, buffered)", ["io_mode"], unit="bytes", registry=r)
        self.layer_load_seconds = Histogram(
            "gdsllm_layer_load_seconds", "Time to read one unit (layer) into its slot",
            buckets=LAYER_BUCKETS, registry=r)
        self.layer_compute_seconds = Histogram(
            "gdsllm_layer_compute_seconds", "Time to run one unit (layer) for one batch pass",
            buckets=LAYER_BUCKETS, registry=r)
        self.compute_stall_seconds = Counter(
            "gdsllm_compute_stall_seconds", "Time compute waited on storage (a unit not yet loaded)",
            registry=r)
        self.prompt_tokens = Counter("gdsllm_prompt_tokens", "Prompt tokens processed (prefill)",
                                     registry=r)
        self.generation_tokens = Counter("gdsllm_generation_tokens", "Tokens generated (sampled)",
                                         registry=r)
        self.ttft_seconds = Histogram(
            "gdsllm_time_to_first_token_seconds", "Time from a request's arrival to its first token",
            buckets=TOKEN_BUCKETS, registry=r)
        self.itl_seconds = Histogram(
            "gdsllm_inter_token_latency_seconds", "Time between two tokens of one request",
            buckets=TOKEN_BUCKETS, registry=r)
        self.request_seconds = Histogram(
            "gdsllm_request_duration_seconds", "Time from a request's arrival to its end",
            buckets=REQUEST_BUCKETS, registry=r)
        self.requests = Counter("gdsllm_requests", "Requests ended, by finish reason "
                                "(stop, length, cancelled, error)", ["finish_reason"], registry=r)
        self.requests_running = Gauge("gdsllm_requests_running", "Requests in the running batch",
                                      registry=r)
        self.requests_waiting = Gauge("gdsllm_requests_waiting", "Requests queued, not yet running",
                                      registry=r)
        self.vram_budget = Gauge("gdsllm_vram_budget_bytes", "Device memory budget for weights "
                                 "(resident units plus streaming slots)", registry=r)
        self.vram_resident = Gauge("gdsllm_vram_resident_bytes", "Bytes of units pinned resident "
                                   "in device memory", registry=r)
        self.slots_in_flight = Gauge("gdsllm_slots_in_flight", "Streaming slots holding a unit being "
                                     "read or computed", registry=r)
        self.draft_tokens = Counter("gdsllm_draft_tokens", "Tokens proposed by the draft model "
                                    "(speculative decoding)", registry=r)
        self.draft_accepted_tokens = Counter(
            "gdsllm_draft_accepted_tokens", "Draft tokens the target model accepted", registry=r)
        self.tokens_per_target_pass = Histogram(
            "gdsllm_tokens_per_target_pass", "Tokens one sequence gained from one target pass that "
            "verified its draft (accepted drafts plus the target's own token)",
            buckets=SPEC_BUCKETS, registry=r)
        self.draft_size = Histogram(
            "gdsllm_draft_size", "Draft tokens one sequence proposed for one target pass: a chain's "
            "length or a token tree's nodes (--draft-tree)", buckets=TREE_BUCKETS, registry=r)
        self.draft_seconds = Histogram(
            "gdsllm_draft_seconds", "Time the compute worker spent drafting for one target pass "
            "(all its sequences)", buckets=LAYER_BUCKETS, registry=r)
        self.http_requests = Counter(
            "gdsllm_http_requests", "HTTP API requests answered, by route and status code "
            "(499: the client left first)", ["route", "status"], registry=r)
        self.http_request_seconds = Histogram(
            "gdsllm_http_request_duration_seconds", "Time to answer an HTTP API request (a stream: "
            "until its last byte)", ["route"], buckets=REQUEST_BUCKETS, registry=r)
        # A mixture of experts (gdsllm.service.experts): what the expert cache read and served.
        self.expert_loads = Counter("gdsllm_expert_loads", "Experts read from storage, on demand "
                                    "(routed, not resident) or on a prefetch guess", ["reason"], registry=r)
        self.expert_cache_hits = Counter("gdsllm_expert_cache_hits", "Routed experts already in VRAM "
                                         "(or on their way in) when their router picked them", registry=r)
        self.expert_routed = Counter("gdsllm_expert_routed", "Experts routed, per MoE layer and pass "
                                     "(the union over the batch)", registry=r)
        self.expert_prefetch_hits = Counter("gdsllm_expert_prefetch_hits", "Experts read on a guess "
                                            "that the next layer's router then picked", registry=r)
        self.expert_prefetch_misses = Counter("gdsllm_expert_prefetch_misses", "Experts read on a "
                                              "guess that the router did not pick (bandwidth only)", registry=r)
        self.expert_read_bytes = Counter("gdsllm_expert_read_bytes", "Expert weight bytes read from "
                                         "storage", unit="bytes", registry=r)
        self._expert_seen: dict[str, int] = {}
        # Known label values start at 0, so rate() and the dashboard have series before the first
        # event (Prometheus' advice for labelled counters).
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)
        for reason in ("demand", "prefetch"):
            self.expert_loads.labels(reason=reason)
        for route in HTTP_ROUTES:
            self.http_requests.labels(route=route, status="200")
            self.http_request_seconds.labels(route=route)

    # -------------------------------------------------------------- service state

    def set_build_info(self, version: str, backend: str, io_mode: str) -> None:
        _check_io_mode(io_mode)
        self.build_info.info({"version": str(version), "backend": str(backend), "io_mode": io_mode})
        self.storage_read_bytes.labels(io_mode=io_mode)  # the path this service reads by, at 0

    def set_budget(self, budget_bytes: int | None, resident_bytes: int) -> None:
        """budget_bytes None (no --vram-budget: everything resident) reports the resident bytes."""
        budget = resident_bytes if budget_bytes is None else budget_bytes
        assert budget >= 0 and resident_bytes >= 0, (budget_bytes, resident_bytes)
        self.vram_budget.set(budget)
        self.vram_resident.set(resident_bytes)

    def set_requests(self, running: int, waiting: int) -> None:
        assert running >= 0 and waiting >= 0, (running, waiting)
        self.requests_running.set(running)
        self.requests_waiting.set(waiting)

    def set_slots_in_flight(self, n: int) -> None:
        assert n >= 0, n
        self.slots_in_flight.set(n)

    def set_experts(self, totals: dict[str, int]) -> None:
        """The expert scheduler's running totals (gdsllm.service.experts.ExpertScheduler.totals):
        each counter advances by what grew since the last call."""
        counters = {"loads": self.expert_loads.labels(reason="demand"),
                    "prefetch_loads": self.expert_loads.labels(reason="prefetch"),
                    "hits": self.expert_cache_hits, "routed": self.expert_routed,
                    "prefetch_hits": self.expert_prefetch_hits,
                    "prefetch_misses": self.expert_prefetch_misses, "bytes_read": self.expert_read_bytes}
        for name, c in counters.items():
            grew = totals.get(name, 0) - self._expert_seen.get(name, 0)
            if grew > 0:
                c.inc(grew)
                self._expert_seen[name] = totals[name]

    # -------------------------------------------------------------- worker timings

    def observe_load(self, nbytes: int, seconds: float, io_mode: str) -> None:
        """One unit read into a slot (or into its resident place) by the I/O worker."""
        _check_io_mode(io_mode)
        assert nbytes >= 0 and seconds >= 0, (nbytes, seconds)
        self.storage_read_bytes.labels(io_mode=io_mode).inc(nbytes)
        self.layer_load_seconds.observe(seconds)

    def observe_compute(self, seconds: float, units: int = 1) -> None:
        """`seconds` for `units` consecutive units run as one (a resident run): each unit is
        observed with its share, so the count stays one per unit."""
        assert seconds >= 0 and units >= 1, (seconds, units)
        for _ in range(units):
            self.layer_compute_seconds.observe(seconds / units)

    def add_stall(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.compute_stall_seconds.inc(seconds)

    # -------------------------------------------------------------- requests

    def add_prompt_tokens(self, n: int) -> None:
        assert n >= 0, n
        self.prompt_tokens.inc(n)

    def add_generation_tokens(self, n: int) -> None:
        assert n >= 0, n
        self.generation_tokens.inc(n)

    def observe_ttft(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.ttft_seconds.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        assert seconds >= 0, seconds
        self.itl_seconds.observe(seconds)

    def observe_speculation(self, proposed: int, accepted: int) -> None:
        """One sequence's target pass over its `proposed` draft tokens, `accepted` of them kept."""
        assert 0 <= accepted <= proposed, (proposed, accepted)
        self.draft_tokens.inc(proposed)
        self.draft_accepted_tokens.inc(accepted)
        self.tokens_per_target_pass.observe(accepted + 1)
        self.draft_size.observe(proposed)

    def observe_draft_seconds(self, seconds: float) -> None:
        """One target pass's drafting time (PassResult.draft_seconds)."""
        assert seconds >= 0, seconds
        self.draft_seconds.observe(seconds)

    def observe_request(self, seconds: float, finish_reason: str) -> None:
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish reason {finish_reason!r} (one of {FINISH_REASONS})")
        assert seconds >= 0, seconds
        self.request_seconds.observe(seconds)
        self.requests.labels(finish_reason=finish_reason).inc()

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request of the OpenAI-compatible front end, answered (or abandoned: 499)."""
        assert seconds >= 0, seconds
        self.http_requests.labels(route=route, status=str(int(status))).inc()
        self.http_request_seconds.labels(route=route).observe(seconds)

    # -------------------------------------------------------------- export

    def exposition(self) -> bytes:
        """The text format a scrape of /metrics returns."""
        return generate_latest(self.registry)

    def start_http(self, host: str = "127.0.0.1", port: int = 9400) -> WSGIServer:
        """Serve /metrics from a daemon thread; port 0 picks a free port (then in `self.port`).

        Returns the server: `server.shutdown(); server.server_close()` stops it.
        """
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port}: {e.strerror or e} "
                          f"(--metrics-port picks another; 0 picks a free one)") from e
        self.port = server.server_port
        return server


def _check_io_mode(io_mode: str) -> None:
    if io_mode not in IO_PATHS:
        raise ValueError(f"unknown io_mode {io_mode!r} (one of {IO_PATHS})")
