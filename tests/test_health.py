"""Health follows outcomes (issue 24, defect 7): a unit that keeps failing makes the service
"degraded" naming it (and "ok" again once a pass completes), a stopped worker is caught without
waiting for the 300 s pass timeout, /v1/models answers 503 with /health, and `--exit-on-degraded`
makes `gdsllm serve` exit for its service manager to restart it. Real processes, a tiny model.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from gdsllm.service.client import Client, ServiceError
from gdsllm.service.supervisor import EXIT_DEGRADED, IO_FAILURES_DEGRADED
from http_helpers import HttpServe, get, wait_for
from service_helpers import (N, PROMPTS, UNIT, Service, alive, generate_past_io_errors,  # noqa: F401
                             light_reference, model_dir, single_thread_workers)

pytestmark = pytest.mark.usefixtures("single_thread_workers")
E_H = 131072 + 135168  # embed + head resident; the 4 blocks stream through 2 slots


def test_a_unit_that_keeps_failing_makes_health_degraded_until_a_pass_completes(
        model_dir, light_reference, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(model_dir, root)
    f = root / "layer_002.bin"
    with Service(root, vram_budget=E_H + 2 * UNIT, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=60) as c:
        assert c.generate(PROMPTS[1], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[1]]
        f.rename(tmp_path / "away.bin")  # deleted while serving: every pass needs it
        for _ in range(IO_FAILURES_DEGRADED):
            with pytest.raises(ServiceError) as err:
                c.generate(PROMPTS[1], max_tokens=N, temperature=0)
            assert err.value.code == "io_error" and "layer_002.bin" in err.value.message
        h = c.health()
        assert h.status == "degraded" and "layer_002.bin" in h.detail and "in a row" in h.detail
        (tmp_path / "away.bin").rename(f)
        assert generate_past_io_errors(c, PROMPTS[1], 3).token_ids == light_reference[PROMPTS[1]]
        assert c.health().status == "ok"


def test_a_stopped_worker_is_caught_long_before_the_pass_timeout(model_dir, light_reference):
    """SIGSTOP, default pass_timeout_s (300): the request fails within the client's 60 s."""
    with Service(model_dir, vram_budget=E_H + 2 * UNIT, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=60) as c:
        assert s.svc.config.pass_timeout_s == 300
        stopped = s.svc.coordinator.workers.pids["io"]
        stream = c.stream_messages(PROMPTS[0], max_tokens=400, temperature=0, ignore_eos=True)
        next(stream)
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as err:
            for _ in stream:
                pass
        print(f"SIGSTOP io worker: request failed after {time.monotonic() - t0:.1f} s")
        assert err.value.code == "timeout" and "stopped" in err.value.message
        wait_for(lambda: c.health().status == "ok", "for the workers to be replaced", timeout=60)
        assert not alive(stopped), "the stopped worker was not replaced"
        assert c.generate(PROMPTS[1], max_tokens=N, temperature=0).token_ids == light_reference[PROMPTS[1]]


def _workers(s: HttpServe) -> list[int]:
    return wait_for(lambda: s.children() if len(s.children()) >= 2 else None, "for the workers")


def test_models_follow_health_and_exit_on_degraded(model_dir, tmp_path):
    s = HttpServe(model_dir, tmp_path / "a.log", "--restart-limit", "0", wait=False)
    b = HttpServe(model_dir, tmp_path / "b.log", "--restart-limit", "0", "--exit-on-degraded",
                  wait=False)  # starts meanwhile: checked second
    try:
        try:
            s.wait_ready()
            assert get(s.url + "/v1/models")[0] == 200
            os.kill(_workers(s)[-1], signal.SIGKILL)
            wait_for(lambda: get(s.url + "/health")[0] == 503, "for /health to say degraded", proc=s.proc)
            status, body = get(s.url + "/v1/models")
            assert status == 503 and "degraded" in body["error"]["message"], body
            assert s.proc.poll() is None  # degraded, but only --exit-on-degraded ends it
        finally:
            assert s.stop() == 0, s.log_tail()
        b.wait_ready()
        os.kill(_workers(b)[-1], signal.SIGKILL)
        assert b.proc.wait(60) == EXIT_DEGRADED, b.log_tail()
        assert "--exit-on-degraded" in b.log_tail()
    finally:
        b.stop()
