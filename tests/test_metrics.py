"""ServiceMetrics: names, values, the exposition promtool accepts, and the /metrics HTTP server.

    python3 -m pytest tests/test_metrics.py
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gdsllm.service.metrics import LAYER_BUCKETS, TOKEN_BUCKETS, ServiceMetrics

# DESIGN.md's list, as exposed (counters with _total, Info as _info).
DESIGN_NAMES = [
    "gdsllm_storage_read_bytes_total", "gdsllm_layer_load_seconds", "gdsllm_layer_compute_seconds",
    "gdsllm_compute_stall_seconds_total", "gdsllm_prompt_tokens_total",
    "gdsllm_generation_tokens_total", "gdsllm_time_to_first_token_seconds",
    "gdsllm_inter_token_latency_seconds", "gdsllm_request_duration_seconds",
    "gdsllm_requests_running", "gdsllm_requests_waiting", "gdsllm_vram_budget_bytes",
    "gdsllm_vram_resident_bytes", "gdsllm_slots_in_flight", "gdsllm_build_info",
]


def fed() -> ServiceMetrics:
    """A ServiceMetrics fed with the sample values the assertions below check."""
    m = ServiceMetrics()
    m.set_build_info("0.1.0", "cpu", "posix")
    m.set_budget(3 << 20, 1 << 20)
    m.observe_load(4096, 0.002, "posix")
    m.observe_load(8192, 0.5, "posix")
    m.observe_load(100, 0.01, "compat")
    m.observe_compute(0.003)
    m.add_stall(0.25)
    m.add_stall(0.5)
    m.add_prompt_tokens(7)
    m.add_generation_tokens(5)
    m.add_generation_tokens(1)
    m.observe_ttft(0.2)
    m.observe_itl(0.05)
    m.observe_itl(12.0)
    m.observe_request(1.5, "length")
    m.observe_request(0.5, "stop")
    m.set_requests(2, 3)
    m.set_slots_in_flight(2)
    return m


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_names_and_values():
    s = samples(fed().exposition().decode())
    names = {n for n, _ in s}
    for name in DESIGN_NAMES:
        assert name in names or f"{name}_count" in names, f"{name} missing from the exposition"
    assert all(n.startswith("gdsllm_") for n in names)
    assert s[("gdsllm_storage_read_bytes_total", (("io_mode", "posix"),))] == 4096 + 8192
    assert s[("gdsllm_storage_read_bytes_total", (("io_mode", "compat"),))] == 100
    assert s[("gdsllm_layer_load_seconds_count", ())] == 3
    assert s[("gdsllm_layer_load_seconds_sum", ())] == pytest.approx(0.512)
    assert s[("gdsllm_compute_stall_seconds_total", ())] == 0.75
    assert s[("gdsllm_prompt_tokens_total", ())] == 7
    assert s[("gdsllm_generation_tokens_total", ())] == 6
    assert s[("gdsllm_inter_token_latency_seconds_bucket", (("le", "20.0"),))] == 2
    assert s[("gdsllm_inter_token_latency_seconds_bucket", (("le", "10.0"),))] == 1
    assert s[("gdsllm_request_duration_seconds_count", ())] == 2
    assert s[("gdsllm_requests_total", (("finish_reason", "length"),))] == 1
    assert s[("gdsllm_requests_total", (("finish_reason", "cancelled"),))] == 0  # known, at 0
    assert s[("gdsllm_requests_running", ())] == 2 and s[("gdsllm_requests_waiting", ())] == 3
    assert s[("gdsllm_vram_budget_bytes", ())] == 3 << 20
    assert s[("gdsllm_vram_resident_bytes", ())] == 1 << 20
    assert s[("gdsllm_slots_in_flight", ())] == 2
    info = (("backend", "cpu"), ("io_mode", "posix"), ("version", "0.1.0"))
    assert s[("gdsllm_build_info", info)] == 1


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run .ci/install-prometheus.sh (Debian's prometheus package)")
    text = fed().exposition()
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    # promtool prints lint problems (bad names, units, missing _total) and exits 1 on any.
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_buckets_fit_layers_and_tokens():
    assert LAYER_BUCKETS[0] <= 0.001 and LAYER_BUCKETS[-1] >= 5  # ms to seconds
    assert TOKEN_BUCKETS[0] <= 0.001 and TOKEN_BUCKETS[-1] >= 30  # ms to tens of seconds
    assert list(LAYER_BUCKETS) == sorted(LAYER_BUCKETS)
    assert list(TOKEN_BUCKETS) == sorted(TOKEN_BUCKETS)


def test_own_registries_never_the_global_one():
    a, b = ServiceMetrics(), ServiceMetrics()  # would raise "Duplicated timeseries" if shared
    a.add_generation_tokens(3)
    assert samples(b.exposition().decode())[("gdsllm_generation_tokens_total", ())] == 0
    assert REGISTRY.get_sample_value("gdsllm_generation_tokens_total") is None


def test_budget_none_reports_the_resident_bytes():
    m = ServiceMetrics()
    m.set_budget(None, 12345)
    s = samples(m.exposition().decode())
    assert s[("gdsllm_vram_budget_bytes", ())] == s[("gdsllm_vram_resident_bytes", ())] == 12345


def test_rejects_unknown_labels():
    m = ServiceMetrics()
    with pytest.raises(ValueError, match="io_mode 'nvme'"):
        m.observe_load(1, 0.1, "nvme")
    with pytest.raises(ValueError, match="io_mode"):
        m.set_build_info("0.1.0", "cpu", "fast")
    with pytest.raises(ValueError, match="finish reason 'timeout'"):
        m.observe_request(1.0, "timeout")


def test_http_server_on_a_free_port():
    m = fed()
    server = m.start_http("127.0.0.1", 0)
    try:
        assert m.port == server.server_port and m.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert samples(body)[("gdsllm_generation_tokens_total", ())] == 6
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{m.port}"):
            ServiceMetrics().start_http("127.0.0.1", m.port)  # taken
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # the port is free again (REUSEADDR: the scrape left a TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", m.port))
