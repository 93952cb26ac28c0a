"""Shared by the worker tests: a tiny model, a worker process with the coordinator's socket end.

    compute = Peer(run_compute_process, (ServiceConfig(model=path), arena_bytes), endpoint_dir, "compute")
    compute.hello                 # its first message: ComputeReady (the arena it owns) or WorkerError
    io = Peer(run_io_process, (ServiceConfig(model=path),), endpoint_dir, "io", arena=spec)
    io.hello                      # its reply to AttachArena(spec): IoReady or WorkerError
    io.send(Load(1, 0, 0)); io.recv()
    io.close()                    # Shutdown, join (kill after a deadline); returns the exit code

`spec` is an ipc.arena.ArenaSpec: of an arena the test owns (Arena.create), or `arena_of(compute.hello)`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gdsllm.format.metadata import LlamaParams, load_model_meta, unit_layout, unit_tensor_shapes
from gdsllm.convert.writer import ModelWriter
from ipc import sockets
from ipc.arena import Arena, ArenaSpec
from ipc.messages import AttachArena, ComputeReady, Load, Loaded, Shutdown
from ipc.worker_messages import shm_names

SPAWN = mp.get_context("spawn")
START_S = 120.0  # spawn + importing torch on a loaded 2-core CI machine
REPLY_S = 60.0

PARAMS = LlamaParams(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)


def write_model(dst: Path, seed: int = 0, nan_head: bool = False, tied: bool = False) -> Path:
    """A random 3-block LLaMA; `nan_head` poisons the LM head (logits NaN: sampling fails);
    `tied`: the head is the embedding, stored once (the head unit holds the norm alone)."""
    g = torch.Generator().manual_seed(seed)
    params = replace(PARAMS, tie_word_embeddings=tied)
    with ModelWriter(dst, params, "float32", source="test") as w:
        for _, kind, _ in unit_layout(params):
            tensors = {k: torch.randn(s, generator=g) * (1.0 if k.endswith("norm.weight") else 0.1)
                       + (1.0 if k.endswith("norm.weight") else 0.0)
                       for k, s in unit_tensor_shapes(params, kind).items()}
            if kind == "head" and nan_head:
                tensors["lm_head.weight"][:] = float("nan")
            w.add_unit(tensors)
    return dst


def shm_of(pid: int) -> list[str]:
    """Shared-memory arenas created by process `pid` (other suites run beside this one)."""
    return shm_names(pid)


def arena_of(ready: ComputeReady) -> ArenaSpec:
    """The arena a compute worker announced, as the I/O worker opens it."""
    return ArenaSpec(ready.backend, ready.handle, ready.arena_bytes, int(ready.device.partition(":")[2] or 0))


class Peer:
    """A worker process and the coordinator's end of its PAIR socket. `arena`: an I/O worker
    is sent AttachArena for it first (`hello` is then the reply). `hello`: wait for the first
    message (its handshake)."""

    def __init__(self, target, args: tuple, endpoint_dir: sockets.EndpointDir, name: str,
                 arena: ArenaSpec | None = None, hello: bool = True):
        ep = endpoint_dir.endpoint(name)
        self.sock = sockets.pair(sockets.context(), ep, bind=True)
        self.proc = SPAWN.Process(target=target, args=(args[0], ep, *args[1:]), daemon=True)
        self.proc.start()
        if arena is not None:  # queued until it connects; one that fails first never reads it
            attach = AttachArena(arena.backend, arena.handle, arena.nbytes, arena.device)
            sockets.send(self.sock, attach, START_S)
        # hello=False: an I/O worker told nothing yet says nothing (unless it fails to start)
        self.hello = sockets.recv(self.sock, START_S) if hello else None

    def send(self, msg) -> None:
        sockets.send(self.sock, msg, REPLY_S)

    def recv(self, timeout_s: float = REPLY_S):
        return sockets.recv(self.sock, timeout_s)

    def close(self) -> int | None:
        if self.proc.is_alive():
            try:
                sockets.send(self.sock, Shutdown(), 2.0)
            except TimeoutError:
                pass  # it is exiting already (after a fatal error) and no longer connected
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.sock.close()
        return self.proc.exitcode


def load_all(io: Peer, meta, base: int = 0) -> list[int]:
    """Load every unit back to back from `base`; several loads in flight; returns the offsets."""
    offsets, off = [], base
    for u in meta.units:
        offsets.append(off)
        off += u.nbytes
    for u, o in zip(meta.units, offsets):
        io.send(Load(u.index, u.index, o))
    got = [io.recv() for _ in meta.units]
    assert all(isinstance(m, Loaded) and m.error is None for m in got), got
    assert sorted(m.unit for m in got) == list(range(len(meta.units)))
    for m in got:
        assert m.nbytes == meta.units[m.unit].nbytes and m.seconds >= 0 and m.io_path == io.hello.io_path
    return offsets


def arena_size(meta) -> int:
    return sum(u.nbytes for u in meta.units) + 4096


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("workers") / "tiny")


@pytest.fixture
def arena(model):
    """A CPU arena the test owns, as the compute worker would, sized for the tiny models."""
    with Arena.create("cpu", arena_size(load_model_meta(model))) as a:
        yield a


@pytest.fixture
def edir():
    with sockets.EndpointDir() as d:
        yield d


def compute_dies_after_its_arena(config, endpoint: str, arena_bytes: int) -> None:
    """A compute worker's entry point that makes its shared-memory arena and dies (SIGKILL-like:
    no clean-up) before saying ComputeReady."""
    Arena.create("cpu", arena_bytes)
    os._exit(3)
