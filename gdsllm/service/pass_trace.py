"""GDSLLM_PASS_TRACE=FILE: per-pass timestamps from the coordinator and the compute worker, to see
where the time between two passes goes (the device waits there for the host).

    trace = PassTrace("worker")      # off (every call a no-op) unless GDSLLM_PASS_TRACE is set
    trace("plan_received", pass_id)

Each event is one JSON line appended to FILE (O_APPEND: both processes write the same file):
{"proc": "worker" | "coordinator", "event": ..., "pass": id, "t": time.monotonic()} (one clock
for every process of the machine). Worker events: `plan_received` (its StartPass read off the
socket), `plan_launched` (the plan begun: samplers, tables and the pass's inputs set; its first Run is
issued next),
`result_sent` (PassResult sent). Coordinator events: `result_received` (a PassResult read),
`plan_sent` (a StartPass sent; `"ahead": true` for a pass scheduled ahead). benchmarks/pass_gaps.py
summarises a file.
"""
from __future__ import annotations

import json
import os
import time

TRACE_ENV = "GDSLLM_PASS_TRACE"


class PassTrace:
    def __init__(self, proc: str):
        self.proc = proc
        path = os.environ.get(TRACE_ENV)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None

    def __call__(self, event: str, pass_id: int, t: float | None = None, **extra) -> None:
        if self.fd is None:
            return
        rec = {"proc": self.proc, "event": event, "pass": pass_id,
               "t": time.monotonic() if t is None else t, **extra}
        os.write(self.fd, (json.dumps(rec) + "\n").encode())
