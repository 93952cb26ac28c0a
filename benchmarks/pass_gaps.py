"""Where the time between two passes goes, from a GDSLLM_PASS_TRACE file
(gdsllm.service.pass_trace): run the service with GDSLLM_PASS_TRACE=FILE, decode, then

    python3 benchmarks/pass_gaps.py FILE [--skip N]

For every pass N+1 that followed a pass N with no idle time between (the worker's plan for N+1
read within --idle-ms of N's result), medians in microseconds of:
  gap         worker: result N sent -> plan N+1 launched (the device idles, less what it still
              had queued: on CUDA the host runs ahead of the kernels)
  wait        worker: result N sent -> plan N+1 read off its socket (0 when it was waiting there)
  begin       worker: plan N+1 read -> launched (decoding it, samplers, tables, inputs)
  hop_result  result N sent (worker) -> received (coordinator)
  coord       coordinator: result N received -> plan N+1 sent (0 or less: sent ahead)
  hop_plan    plan N+1 sent (coordinator) -> read (worker)
  pass        worker: plan N launched -> result N sent
and how many of those passes were scheduled ahead.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def load(path: str) -> dict[tuple[str, str], dict[int, float]]:
    ev: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    ahead = set()
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            ev[r["proc"], r["event"]][r["pass"]] = r["t"]
            if r.get("ahead"):
                ahead.add(r["pass"])
    ev["ahead", ""] = {p: 1.0 for p in ahead}
    return ev


def gaps(ev, skip: int = 0, idle_ms: float = 50.0) -> dict:
    sent, recv = ev["worker", "result_sent"], ev["worker", "plan_received"]
    launched, got = ev["worker", "plan_launched"], ev["coordinator", "result_received"]
    out = ev["coordinator", "plan_sent"]
    rows = defaultdict(list)
    n_ahead = 0
    for p in sorted(sent)[skip:]:
        q = p + 1
        if q not in recv or q not in launched or recv[q] - sent[p] > idle_ms / 1e3:
            continue  # the first pass of a request: the service was idle before it
        n_ahead += q in ev["ahead", ""]
        rows["gap"].append(launched[q] - sent[p])
        rows["wait"].append(max(0.0, recv[q] - sent[p]))
        rows["begin"].append(launched[q] - recv[q])
        if p in got:
            rows["hop_result"].append(got[p] - sent[p])
            if q in out:
                rows["coord"].append(out[q] - got[p])
        if q in out:
            rows["hop_plan"].append(recv[q] - out[q])
        if p in launched:
            rows["pass"].append(sent[p] - launched[p])
    res = {k: round(statistics.median(v) * 1e6, 1) for k, v in rows.items()}
    res["passes"], res["ahead"] = len(rows["gap"]), n_ahead
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N passes (warm-up)")
    ap.add_argument("--idle-ms", type=float, default=50.0,
                    help="a plan read later than this after the last result started after idle time")
    a = ap.parse_args()
    print(json.dumps(gaps(load(a.file), a.skip, a.idle_ms)))


if __name__ == "__main__":
    main()
