"""Measurements for `gdsllm bench` and `benchmarks/`: the storage ceiling, page-cache growth,
peak RSS, and GdsLLM itself driven through a real `gdsllm serve` process and its client.

    ceiling = storage_ceiling(model_files, threads=8)           # bytes/s, O_DIRECT, cold
    with Served(model, device="cuda", vram_budget="8GiB") as srv:
        r = srv.decode(prompt, n=16)                             # DecodeResult
        peaks = srv.peak_rss()                                   # {pid: bytes}

"Cold" means the page cache was dropped right before (`drop_caches()`, root only).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gdsllm.format.storage import CHUNK, aligned_host_buffer


def drop_caches() -> bool:
    """Write back and drop the page cache (root only). Returns False where that is not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def meminfo_cached() -> int:
    """Page cache in bytes: `Cached` less `Shmem` from /proc/meminfo (shared memory, such as the
    CPU backend's arena, is counted in `Cached` but is not file pages)."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
    return fields["Cached"] - fields.get("Shmem", 0)


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """All descendants of `pid` (from /proc/*/stat parent links)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def evict(path) -> None:
    """Drop one file's pages from the page cache (written back first, so they are clean): a cold
    read of that file without dropping the whole machine's cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache right now (fincore, else mincore(2) through ctypes)."""
    if shutil.which("fincore"):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             check=True, capture_output=True, text=True).stdout
        return int(out.split()[0])
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable view for ctypes; no page touched
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.c_void_p.from_buffer(m)  # the mapping's address
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(addr)), ctypes.c_size_t(size), vec)
        del addr
        m.close()
        assert rc == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec) * mmap.PAGESIZE


def storage_ceiling(files: list[Path], threads: int = 8) -> tuple[float, int]:
    """Raw parallel O_DIRECT read of `files` into host memory: (bytes/s, bytes).

    `threads` requests of CHUNK bytes are in flight, the way a tuned reader would drive the disk;
    this is the bound any streaming runtime on this disk must be compared against.
    """
    bufs = [aligned_host_buffer(CHUNK) for _ in range(threads)]
    jobs = []
    for path in files:
        size = path.stat().st_size
        jobs += [(path, off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
    fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECT) for p in files}

    def work(k: int) -> int:
        mv = memoryview(bufs[k].numpy())
        n = 0
        for path, off, length in jobs[k::threads]:
            length_aligned = (length + 4095) // 4096 * 4096
            n += os.preadv(fds[path], [mv[:length_aligned]], off)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(work, range(threads)))
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return total / dt, total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DecodeResult:
    tokens: int
    prompt_tokens: int
    ttft_s: float
    total_s: float
    token_ids: list[int]

    @property
    def decode_s_per_token(self) -> float:
        """Seconds per generated token after the first (the steady streaming cost)."""
        return (self.total_s - self.ttft_s) / max(self.tokens - 1, 1)


class Served:
    """A real `gdsllm serve` subprocess and a client for it; a context manager."""

    def __init__(self, model: Path, *, device: str = "cuda", vram_budget: str | None = None,
                 prefetch_window: int = 2, io: str = "direct", extra: list[str] | None = None,
                 startup_s: float = 600.0, log: Path | None = None):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "gdsllm", "serve", "-m", str(model), "--device", device,
               "--endpoint", self.endpoint, "--prefetch-window", str(prefetch_window), "--io", io,
               "--metrics-port", str(free_port())]
        if vram_budget:
            cmd += ["--vram-budget", vram_budget]
        self.cmd = cmd + (extra or [])
        self.log = open(log, "ab") if log else subprocess.DEVNULL
        self.startup_s = startup_s

    def __enter__(self) -> "Served":
        from gdsllm.service.client import Client
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + self.startup_s
        while True:  # the handshake (resident units loaded) ends when health answers
            if self.proc.poll() is not None:
                raise RuntimeError(f"gdsllm serve exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            with Client(self.endpoint, timeout=2.0) as probe:
                try:
                    self.health = probe.health()
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        self.client = Client(self.endpoint, timeout=self.startup_s)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def peak_rss(self) -> dict[int, int]:
        return {p: peak_rss(p) for p in [self.proc.pid, *children(self.proc.pid)]}

    def decode(self, prompt: str, n: int) -> DecodeResult:
        r = self.client.generate(prompt=prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
        return DecodeResult(tokens=len(r.token_ids), prompt_tokens=r.prompt_tokens,
                            ttft_s=r.time_to_first_token_s, total_s=r.duration_s,
                            token_ids=list(r.token_ids))

    def concurrent(self, n: int, tokens: int, prompt: str = "Request") -> tuple[int, float]:
        """`n` clients at once, each a greedy request of `tokens` tokens: (tokens generated in
        all, wall seconds)."""
        from gdsllm.service.client import Client
        clients = [Client(self.endpoint, timeout=600.0) for _ in range(n)]
        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                outs = list(pool.map(lambda c: c.generate(prompt=f"{prompt} {id(c)}", max_tokens=tokens,
                                                          temperature=0.0, ignore_eos=True), clients))
            return sum(len(o.token_ids) for o in outs), time.perf_counter() - t0
        finally:
            for c in clients:
                c.close()
