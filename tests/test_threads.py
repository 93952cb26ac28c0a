"""Each process of the pipeline computes with the threads of its role (gdsllm.service.threads)."""
import pytest
import torch

from gdsllm.service.threads import set_threads, threads_for


def test_io_and_coordinator_take_one_thread_compute_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_for("io") == 1
    assert threads_for("coordinator") == 1
    assert threads_for("compute") == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_for("compute") == 3  # the user's choice wins
    assert threads_for("io") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "banana")  # not a count: torch's default
    assert threads_for("compute") == torch.get_num_threads()
    with pytest.raises(ValueError, match="unknown process role 'gpu'"):
        threads_for("gpu")


def test_set_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert set_threads("io") == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
