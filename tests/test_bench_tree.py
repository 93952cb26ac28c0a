"""benchmarks/bench_tree.py end to end on a small synth on the CPU (its smoke mode), so the GPU run
finds no error of its own: every run kind, greedy texts compared, the JSON written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdsllm.convert.synth import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_tree_smoke(tmp_path):
    model = synth(tmp_path / "model", "smollm2-135m", layers=6, dtype="float16", seed=3)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "benchmarks/bench_tree.py", "--work", str(tmp_path), "--model",
                        str(model), "--device", "cpu", "--max-tokens", "3", "--self-layers", "2",
                        "--tree", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "results-tree.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"nodraft", "chain_self", "chain_self_fixed", "tree_self", "tree_self_auto", "ngram",
                         "tree_ngram", "chain_int4", "tree_int4"}
    assert all(all(r["greedy_identical"]) for k, r in runs.items() if k != "nodraft")
    assert runs["tree_self"]["tree_nodes_per_tree_pass"] > 1 and runs["nodraft"]["streamed_units"] > 0
