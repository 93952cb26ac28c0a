"""The shared test fixtures keep their promises: SmolLM2 converted once per run for every user and
removed at the end, GPU tests skipped with a reason a user understands, and a hung test ending the
run with its stack instead of running CI into its time limit.

    python3 -m pytest tests/test_fixtures.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import conftest


def test_the_run_s_conversions_are_removed_when_it_ends(monkeypatch, tmp_path):
    d = tmp_path / "models"
    (d / "xdg" / "gdsllm" / "smollm2").mkdir(parents=True)
    (d / "xdg" / "gdsllm" / "smollm2" / "layer_000.bin").write_bytes(b"x" * 4096)
    monkeypatch.setattr(conftest, "_session_dir", d)
    conftest.pytest_sessionfinish(None, 0)
    assert not d.exists()


@pytest.mark.slow
def test_one_conversion_serves_every_test(smollm2_model, xdg_cache):
    from llama_ref import smollm2
    assert smollm2()[2] == conftest.converted_smollm2("float32")  # the float reference
    assert smollm2_model == conftest.converted_smollm2("default")  # the default model
    assert smollm2_model.parent == xdg_cache / "gdsllm"  # where `gdsllm` itself looks for it
    assert str(conftest._session_dir) in str(smollm2_model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU tests run here")
def test_gpu_tests_skip_saying_they_need_a_cuda_gpu():
    added = []
    items = [SimpleNamespace(keywords={"gpu": True}, add_marker=added.append),
             SimpleNamespace(keywords={}, add_marker=added.append)]
    conftest.pytest_collection_modifyitems(None, items)
    assert [m.kwargs["reason"] for m in added] == ["needs a CUDA GPU"]


def test_a_hung_test_ends_the_run_with_its_stack(tmp_path):
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    env = dict(os.environ, GDSLLM_TEST_TIMEOUT="2", PYTHONPATH=str(Path(conftest.__file__).parent))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                        "test_hang.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert p.returncode != 0
    assert "Timeout (0:00:02)!" in p.stderr and 'test_hang.py", line 4 in test_hangs' in p.stderr, p.stderr
