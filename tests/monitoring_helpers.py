"""Shared by the monitoring tests: where monitoring/ keeps its files, the tools it needs
(promtool, prometheus), a free local port, and the dashboard's PromQL expressions.

    from monitoring_helpers import DASHBOARD, dashboard_exprs, tool
    subprocess.run([tool("promtool"), "check", "config", str(MON / "prometheus.yml")])
"""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
DASHBOARD = MON / "grafana" / "dashboards" / "gdsllm.json"
DATASOURCES = MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = MON / "grafana" / "provisioning" / "dashboards" / "gdsllm.yml"
RATE_WINDOW = "5m"  # what the tests put for Grafana's $__rate_interval


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run .ci/install-prometheus.sh (Debian's prometheus package)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for top in dash["panels"] for p in [top, *top.get("panels", [])]]  # rows nest
    return [t["expr"] for p in panels for t in p.get("targets", [])]

