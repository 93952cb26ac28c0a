"""How many CPU threads each process of the pipeline computes with, by its role.

    from gdsllm.service.threads import set_threads
    set_threads("compute")   # first thing in the process's entry function

Every process that imports torch would otherwise start one OpenMP thread per core, so on a small
CPU machine the three processes of the pipeline (coordinator, I/O worker, compute worker) fight
for the same cores; on the 2-core development machine `gdsllm generate` ran 3x slower through
the pipeline than in one process (issue 25). The compute worker does the math: it gets the cores
(OMP_NUM_THREADS when the user set it, else torch's own default, one per physical core). The I/O
worker (reads and checksums) and the coordinator (sockets, scheduling) compute little: one each.
"""
from __future__ import annotations

import os
import sys

ROLES = ("compute", "io", "coordinator")


def threads_for(role: str) -> int:
    if role not in ROLES:
        raise ValueError(f"unknown process role {role!r} (one of {', '.join(ROLES)})")
    if role != "compute":
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    import torch
    return torch.get_num_threads()


def set_threads(role: str) -> int:
    """Set this process's torch (intra-op) threads for `role`; returns the count. The
    coordinator does not import torch for this: where torch is not loaded, nothing is set."""
    if role == "coordinator" and "torch" not in sys.modules:
        return threads_for(role)
    import torch
    n = threads_for(role)
    torch.set_num_threads(n)
    return n
