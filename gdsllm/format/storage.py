"""Reading unit files into buffers: O_DIRECT `preadv` on the CPU, KvikIO cuFile on CUDA.

The I/O path is always named: `gds` (cuFile with nvidia-fs: NVMe -> DMA -> VRAM), `compat`
(KvikIO compatibility mode: O_DIRECT through small pinned bounce buffers), `posix` (O_DIRECT
`preadv` into host memory, the CPU backend) or `buffered` (page-cache reads, explicit opt-in).

    buf = aligned_host_buffer(unit.nbytes)
    with HostReader(direct=True) as r:
        nbytes = r.read(meta.path(unit), buf, unit.nbytes)

`probe_io_path("cuda")` says which path this machine would take, without reading anything.
"""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gdsllm.format.metadata import ALIGN, align_up

CHUNK = 16 << 20  # bytes per read request; large requests keep the device queue full
IO_PATHS = ("gds", "compat", "posix", "buffered")


def aligned_host_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned (hence 4 KiB-aligned) uint8 host tensor of `nbytes` bytes, for O_DIRECT."""
    # MAP_PRIVATE: Python's default anonymous mmap is MAP_SHARED, i.e. shmem, which /proc/meminfo
    # counts as `Cached` and would look like page-cache growth.
    m = mmap.mmap(-1, max(nbytes, ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=torch.uint8)[:nbytes]


def kvikio_module():
    try:
        import kvikio  # noqa: F401  (optional extra `cuda`)
        import kvikio.defaults
        return kvikio
    except Exception:  # ImportError, or a CUDA driver error on import
        return None


def probe_io_path(device: str, direct: bool = True) -> str:
    """The path reads would take on `device` ("cpu" or "cuda"): gds, compat, posix or buffered."""
    if not direct:
        return "buffered"
    if device == "cpu":
        return "posix"
    kvikio = kvikio_module()
    if kvikio is None:
        return "posix"  # CUDA without KvikIO: O_DIRECT into host memory, then a copy
    # Without the nvidia-fs driver cuFile itself falls back to its own compatibility path even
    # when KvikIO's compat mode is off: only both together mean real GPUDirect Storage.
    if kvikio.defaults.is_compat_mode_preferred() or not os.path.exists("/proc/driver/nvidia-fs"):
        return "compat"
    return "gds"


class HostReader:
    """Reads whole files into host buffers from a pool of threads, O_DIRECT unless `direct=False`.

    Several `CHUNK`-sized `preadv` calls are in flight at once: one synchronous stream of
    requests leaves a fast NVMe mostly idle. `read` returns the bytes read.
    """

    def __init__(self, direct: bool = True, threads: int = 8):
        self.direct = direct
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gdsllm-read")

    def __enter__(self) -> "HostReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _open(self, path: Path) -> int:
        flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
        try:
            return os.open(path, flags)
        except OSError as e:
            raise OSError(e.errno, f"cannot open {path} ({'O_DIRECT' if self.direct else 'buffered'}): "
                          f"{e.strerror}") from None

    def read(self, path: str | os.PathLike, buf: torch.Tensor, nbytes: int, offset: int = 0) -> int:
        """Read `nbytes` of `path` from `offset` (a multiple of 4 KiB) into host uint8 tensor `buf`.

        Every request is 4 KiB-aligned: an `nbytes` that is not a multiple of 4 KiB (a range that
        ends at an unpadded end of file) rounds the last request up, so `buf` must hold
        `align_up(nbytes)` bytes; that request must still return the bytes asked for."""
        assert offset % ALIGN == 0 and buf.numel() >= align_up(nbytes), (offset, nbytes, buf.numel())
        assert buf.device.type == "cpu" and buf.dtype == torch.uint8
        path = Path(path)
        fd = self._open(path)
        try:
            mv = memoryview(buf.numpy()).cast("B")

            def one(off: int) -> int:
                n = min(CHUNK, nbytes - off)
                got = os.preadv(fd, [mv[off: off + align_up(n)]], offset + off)
                if got < n:
                    raise OSError(f"{path}: short read at offset {offset + off}: {got} of {n} "
                                  f"bytes; truncated file?")
                return n

            return sum(f.result() for f in [self.pool.submit(one, o) for o in range(0, nbytes, CHUNK)])
        finally:
            os.close(fd)


class CudaReader:
    """Reads files straight into device memory with KvikIO (`CuFile.pread`), several in flight.

    With `direct`, KvikIO's `auto_direct_io_read` is on: in compatibility mode its default reads go
    through the page cache (DESIGN.md measured +6.3 GB `Cached` for a 6 GB read); with it on they
    do not, and were faster. `task_size` and `threads` follow the same measurement (16 MiB, 8).
    """

    def __init__(self, direct: bool = True, threads: int = 8, task_size: int = CHUNK):
        kvikio = kvikio_module()
        if kvikio is None:
            raise RuntimeError("the CUDA backend needs KvikIO: pip install 'gdsllm[cuda]'")
        self.kvikio = kvikio
        kvikio.defaults.set({"num_threads": threads, "task_size": task_size,
                             "auto_direct_io_read": bool(direct)})
        self.direct = direct
        self.path = probe_io_path("cuda", direct)

    def __enter__(self) -> "CudaReader":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, path: str | os.PathLike, dev_buf, nbytes: int, offset: int = 0):
        """Start reading `nbytes` of `path` from `offset` into device buffer `dev_buf` (anything
        with `__cuda_array_interface__`); returns an `IOFuture` whose `.get()` gives the bytes
        read. Keep `offset` and `nbytes` 4 KiB-aligned (except at the end of the file): KvikIO
        may read an unaligned head or tail through the page cache."""
        f = self.kvikio.CuFile(str(path), "r")
        fut = f.pread(dev_buf, nbytes, offset)
        return _ClosingFuture(f, fut, Path(path), nbytes)

    def read(self, path: str | os.PathLike, dev_buf, nbytes: int, offset: int = 0) -> int:
        return self.submit(path, dev_buf, nbytes, offset).get()


class _ClosingFuture:
    def __init__(self, f, fut, path: Path, nbytes: int):
        self.f, self.fut, self.path, self.nbytes = f, fut, path, nbytes

    def done(self) -> bool:
        return self.fut.done()

    def get(self) -> int:
        try:
            got = self.fut.get()
        finally:
            self.f.close()
        if got != self.nbytes:
            raise OSError(f"{self.path}: short read: {got} of {self.nbytes} bytes; truncated file?")
        return got
