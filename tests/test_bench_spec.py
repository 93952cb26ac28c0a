"""benchmarks/bench_spec.py end to end on a small synth on the CPU (its smoke mode), so the GPU
run finds no error of its own: models made, three `gdsllm serve` runs, the table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_spec_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "benchmarks/bench_spec.py", "--work", str(tmp_path),
                        "--shape", "smollm2-135m", "--layers", "4", "--device", "cpu", "--tokens",
                        "3", "--budget", "auto"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results-spec.json").read_text())
    assert "errors" not in res, res["errors"]
    assert res["fixed"]["proposed"] > 0 and res["adaptive"]["proposed"] > 0
    assert all(res["fixed"]["greedy_identical"]) and all(res["adaptive"]["greedy_identical"])
    assert res["fixed"]["health"]["streamed_units"] > 0  # the draft's bytes came out of the budget
    assert "| no draft |" in (tmp_path / "table-spec.md").read_text()
