"""The shared test fixtures keep their promises: SmolLM2 converted once per run for every user and
removed at the end, and GPU tests skipped with a reason a user understands.

    python3 -m pytest tests/test_fixtures.py
"""
from __future__ import annotations

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
