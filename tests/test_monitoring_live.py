"""A real Prometheus scraping a live service, through which every PromQL expression of the Grafana
dashboard returns data: first a ServiceMetrics fed by hand, then `gdsllm serve` streaming a small
model, whose counters must equal what the run did.

    python3 -m pytest tests/test_monitoring_live.py     # needs prometheus (.ci/install-prometheus.sh)
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from gdsllm.service.metrics import ServiceMetrics
from monitoring_helpers import MON, RATE_WINDOW, ROOT, dashboard_exprs, free_port, tool


# ------------------------------------------------------------------ a real Prometheus


class Prometheus:
    """Debian's prometheus binary on a free port, scraping `target` with the repository's config."""

    def __init__(self, target: str, workdir: Path):
        cfg = yaml.safe_load((MON / "prometheus.yml").read_text())
        cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "500ms"
        [job] = cfg["scrape_configs"]
        job["static_configs"][0]["targets"] = [target]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)
        self.workdir = workdir
        self.wait(lambda: self._get("/-/ready") is not None, "to become ready")

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.read()
        except OSError:
            return None

    def query(self, expr: str) -> list[dict]:
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body is not None, f"Prometheus did not answer {expr!r}"
        reply = json.loads(body)
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait(self, cond, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited {self.proc.returncode}: "
                            f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for prometheus {what}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(target: str) -> Prometheus:
        p = Prometheus(target, tmp_path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def assert_dashboard_has_data(prom: Prometheus) -> None:
    """Every dashboard expression, as Grafana would send it, returns finite samples."""
    for expr in dashboard_exprs():
        q = expr.replace("$__rate_interval", RATE_WINDOW)
        assert "$" not in q, f"Grafana variable left in {expr!r}"
        result = prom.query(q)
        assert result, f"no data for dashboard query {q!r}"
        for series in result:
            assert math.isfinite(float(series["value"][1])), f"{q!r} gave {series}"


@pytest.mark.slow
def test_dashboard_has_data_from_a_scraped_service_metrics(prometheus):
    """A ServiceMetrics fed by hand (no model): pins the dashboard to the metrics module."""
    m = ServiceMetrics()
    m.set_build_info("0.1.0", "cpu", "posix")
    server = m.start_http("127.0.0.1", 0)
    try:
        prom = prometheus(f"127.0.0.1:{m.port}")
        # Observations after the first scrape, so every rate() and quantile sees an increase.
        prom.wait(lambda: prom.query("gdsllm_build_info"), "to scrape the service")
        m.set_budget(1 << 30, 1 << 29)
        for _ in range(3):
            m.observe_load(1 << 20, 0.004, "posix")
            m.observe_compute(0.002)
            m.add_stall(0.001)
        m.add_prompt_tokens(5)
        m.add_generation_tokens(4)
        m.observe_ttft(0.3)
        m.observe_itl(0.02)
        m.observe_request(0.4, "length")
        m.observe_speculation(4, 3)
        m.set_requests(1, 0)
        m.set_slots_in_flight(2)
        m.set_experts({"loads": 3, "prefetch_loads": 2, "hits": 5, "routed": 8, "prefetch_hits": 1,
                       "prefetch_misses": 1, "bytes_read": 5 << 20})
        m.observe_http("/v1/chat/completions", 200, 1.5)
        m.observe_http("/v1/completions", 429, 0.002)
        prom.wait(lambda: prom.value("gdsllm_generation_tokens_total") == 4, "to see the tokens")
        assert_dashboard_has_data(prom)
        assert prom.value("gdsllm_storage_read_bytes_total") == 3 << 20
        assert prom.value('gdsllm_expert_loads_total{reason="prefetch"}') == 2
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ the real service


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def expected_read_bytes(meta, health, passes: int) -> int:
    """Bytes the I/O worker reads for `passes` weight passes, from the metadata and the health reply:
    every resident unit once at start-up, then the streamed units as one cyclic sequence that runs
    `prefetch_window` loads ahead of compute (the next pass's first units load while idle)."""
    sizes = {u.name: u.nbytes for u in meta.units}
    streamed = [u.name for u in meta.units if u.name not in health.resident_units]
    assert len(streamed) == health.streamed_units
    loads = passes * len(streamed) + health.prefetch_window if streamed else 0
    return (sum(sizes[n] for n in health.resident_units)
            + sum(sizes[streamed[s % len(streamed)]] for s in range(loads)))


@pytest.mark.slow
def test_live_service_counters_and_dashboard(prometheus, tmp_path):
    """`gdsllm serve` on the CPU backend, streaming part of a small model every pass, scraped by a
    real Prometheus: after known generations the counters equal what the run did, and every
    dashboard expression returns data."""
    from gdsllm.service.client import Client
    from gdsllm.format.metadata import load_model_meta
    from gdsllm.engine.planner import ALIGN
    from gdsllm.convert.synth import synth

    model = synth(tmp_path / "model", "tiny", layers=6, seed=1, dtype="float32")
    meta = load_model_meta(model)
    aligned = {u.name: -(-u.nbytes // ALIGN) * ALIGN for u in meta.units}
    block = max(aligned[n] for n in aligned if n.startswith("block"))
    # embed, head and two blocks resident, two streaming slots: four blocks stream every pass.
    budget = aligned["embed"] + aligned["head"] + 2 * aligned["block.0"] + 2 * block
    endpoint, metrics_port, http_port = f"tcp://127.0.0.1:{free_port()}", free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gdsllm", "serve", "-m", str(model), "--device", "cpu",
         "--endpoint", endpoint, "--metrics-port", str(metrics_port), "--vram-budget", str(budget),
         "--prefetch-window", "2", "--http-port", str(http_port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        prom = prometheus(f"127.0.0.1:{metrics_port}")  # starts while gdsllm serve starts
        with Client(endpoint, timeout=5) as c:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    health = c.health()
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "gdsllm serve did not start within 120 s"
        assert health.status == "ok" and health.backend == "cpu"
        assert health.resident_units == ["embed", "block.0", "block.1", "head"], health
        assert health.streamed_units == 4 and health.prefetch_window == 2

        # Generate only after the first scrape, so every rate() and quantile sees the increase.
        prom.wait(lambda: prom.query("gdsllm_build_info"), "to scrape gdsllm serve")
        with Client(endpoint, timeout=120) as c:
            finals = [c.generate("Once upon a time", max_tokens=5, temperature=0, ignore_eos=True),
                      c.generate("Hello", max_tokens=3, temperature=0.8, seed=7, ignore_eos=True)]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == "model"  # an HTTP request, no tokens
        assert [f.completion_tokens for f in finals] == [5, 3]
        assert [f.finish_reason for f in finals] == ["length", "length"]
        tokens = sum(f.completion_tokens for f in finals)
        # One request at a time, one token per pass; the prefetched loads of the next pass land
        # after the last reply, so wait for them.
        want_bytes = expected_read_bytes(meta, health, passes=tokens)
        prom.wait(lambda: prom.value("gdsllm_generation_tokens_total") == tokens
                  and prom.value(f'gdsllm_storage_read_bytes_total{{io_mode="{health.io_path}"}}')
                  == want_bytes, f"to see {tokens} tokens and {want_bytes} bytes read")

        assert_dashboard_has_data(prom)
        s = scrape(metrics_port)
        io = (("io_mode", health.io_path),)
        assert s[("gdsllm_generation_tokens_total", ())] == tokens
        assert s[("gdsllm_storage_read_bytes_total", io)] == want_bytes
        assert sum(v for (n, _), v in s.items() if n == "gdsllm_storage_read_bytes_total") == want_bytes
        assert s[("gdsllm_prompt_tokens_total", ())] == sum(f.prompt_tokens for f in finals)
        assert s[("gdsllm_requests_total", (("finish_reason", "length"),))] == 2
        assert s[("gdsllm_time_to_first_token_seconds_count", ())] == 2
        assert s[("gdsllm_inter_token_latency_seconds_count", ())] == tokens - 2
        assert s[("gdsllm_layer_compute_seconds_count", ())] == tokens * len(meta.units)
        assert s[("gdsllm_requests_running", ())] == 0 and s[("gdsllm_requests_waiting", ())] == 0
        assert s[("gdsllm_http_requests_total", (("route", "/v1/models"), ("status", "200")))] == 1
        assert s[("gdsllm_vram_budget_bytes", ())] == budget
        assert s[("gdsllm_vram_resident_bytes", ())] == sum(
            u.nbytes for u in meta.units if u.name in health.resident_units)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
