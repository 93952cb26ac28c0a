"""monitoring/ and compose.yaml, checked statically: configs that promtool accepts, files and ports
that agree, serve arguments that gdsllm accepts, and a dashboard that queries only metrics the
service exports (test_monitoring_live.py runs a real Prometheus).

    python3 -m pytest tests/test_monitoring.py          # needs promtool (.ci/install-prometheus.sh)
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import urllib.parse

import yaml

from gdsllm.service.metrics import ServiceMetrics
from monitoring_helpers import DASHBOARD, DATASOURCES, MON, PROVIDERS, ROOT, dashboard_exprs, tool


def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def serve_args() -> list[str]:
    """The gdsllm service's `gdsllm serve ...` arguments, its shell wrapper undone (model unset)."""
    cmd = compose()["services"]["gdsllm"]["command"]
    text = cmd[0] if isinstance(cmd, list) else cmd
    text = re.sub(r"\$\$\{GDSLLM_MODEL:\+[^}]*\}", "", text)  # the optional -m, empty when unset
    assert "$" not in text, f"unexpected variable in the gdsllm command: {text}"
    args = shlex.split(text)
    assert args[:3] == ["exec", "gdsllm", "serve"], args
    return args[2:]


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def published(service: dict) -> dict[int, str]:
    """container port -> host address of a compose service's short-syntax `ports`."""
    out = {}
    for spec in service.get("ports", []):
        host_ip, _host_port, container = str(spec).rsplit(":", 2) if str(spec).count(":") == 2 \
            else ("0.0.0.0", *str(spec).split(":"))
        out[int(container)] = host_ip
    return out


# ------------------------------------------------------------------ static checks


def test_promtool_accepts_the_scrape_config():
    r = subprocess.run([tool("promtool"), "check", "config", str(MON / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_mounts_and_build_files_exist():
    services = compose()["services"]
    assert set(services) == {"gdsllm", "prometheus", "grafana"}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if not src.startswith("."):
                assert src in compose()["volumes"], f"{name}: named volume {src} not declared"
            elif dst != "/models":  # the user's converted models: docker creates ./models if missing
                assert (ROOT / src).exists(), f"{name} mounts {src}, which does not exist"
    assert services["gdsllm"]["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\S+-runtime-", dockerfile, re.M)
    assert "pip install '.[cuda]'" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "models" in ignored


def test_compose_ports_and_scrape_targets_agree():
    services = compose()["services"]
    gds = services["gdsllm"]
    args = serve_args()
    endpoint = urllib.parse.urlsplit(option(args, "--endpoint"))
    metrics_port = int(option(args, "--metrics-port"))
    http_port = int(option(args, "--http-port"))
    # 0.0.0.0 inside the container only; the host publishes on loopback (the endpoint has no authentication).
    assert endpoint.scheme == "tcp" and endpoint.hostname == "0.0.0.0"
    assert option(args, "--metrics-host") == "0.0.0.0" and option(args, "--device") == "cuda"
    assert option(args, "--http-host") == "0.0.0.0"
    assert published(gds) == {endpoint.port: "127.0.0.1", metrics_port: "127.0.0.1",
                              http_port: "127.0.0.1"}
    assert (endpoint.port, metrics_port, http_port) == (5555, 9400, 8000)
    expose = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1).split()
    assert sorted(map(int, expose)) == sorted([endpoint.port, metrics_port, http_port])
    gpu = gds["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    prom = yaml.safe_load((MON / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"gdsllm:{metrics_port}"]
    prom_svc = services["prometheus"]
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_svc["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom_svc["command"]
    assert published(prom_svc) == {9090: "127.0.0.1"}

    [ds] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    graf = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"])
    assert mounts["./monitoring/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./monitoring/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    [provider] = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["options"]["path"] == mounts["./monitoring/grafana/dashboards"]


def test_compose_serve_arguments_are_accepted_by_gdsllm():
    from gdsllm.cli import build_parser

    ns, unknown = build_parser().parse_known_args(serve_args() + ["-m", "/models/x"])
    # Without --metrics-host, /metrics binds 127.0.0.1 inside the container: Prometheus (another
    # container) and the published port 9400 cannot reach it, and the dashboard stays empty.
    assert not unknown, f"compose.yaml passes {unknown}, which `gdsllm serve` does not accept"
    assert ns.command == "serve" and ns.metrics_port == 9400 and ns.device == "cuda"
    assert ns.endpoint == "tcp://0.0.0.0:5555" and ns.metrics_host == "0.0.0.0"
    assert ns.http_port == 8000 and ns.http_host == "0.0.0.0"


def test_dashboard_uses_the_provisioned_datasource_and_known_metrics():
    dash = json.loads(DASHBOARD.read_text())
    [ds] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "gdsllm"
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds["uid"] and t["expr"], p["title"]
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
                "gauge": [""]}
    exposed = {f.name + s for f in ServiceMetrics().registry.collect() for s in suffixes[f.type]}
    exprs = dashboard_exprs()
    for e in exprs:
        for name in re.findall(r"\bgdsllm_\w+", e):
            assert name in exposed, f"dashboard queries {name}, which gdsllm.service.metrics does not export"
    text = "\n".join(exprs)
    for needed in ("rate(gdsllm_generation_tokens_total", "sum by (io_mode) (rate(gdsllm_storage_read",
                   "rate(gdsllm_compute_stall_seconds_total", "gdsllm_requests_running",
                   "gdsllm_requests_waiting", "gdsllm_vram_budget_bytes", "gdsllm_vram_resident_bytes",
                   "gdsllm_slots_in_flight", "rate(gdsllm_draft_tokens_total",
                   "rate(gdsllm_draft_accepted_tokens_total", "gdsllm_tokens_per_target_pass_sum",
                   "sum by (route, status) (rate(gdsllm_http_requests_total",
                   "rate(gdsllm_expert_loads_total", "rate(gdsllm_expert_cache_hits_total",
                   "rate(gdsllm_expert_prefetch_hits_total", "rate(gdsllm_expert_prefetch_misses_total",
                   "rate(gdsllm_expert_read_bytes_total"):
        assert needed in text, f"no panel queries {needed}"
    for hist in ("time_to_first_token", "inter_token_latency", "layer_load", "layer_compute",
                 "http_request_duration"):
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate(gdsllm_{hist}_seconds_bucket" in text
