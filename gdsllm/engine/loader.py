"""Load and verify: the one path a unit takes from storage into memory, for gdsllm.LLM and the
service's I/O worker alike.

    loader = UnitLoader(meta, "cpu", direct=True)      # picks the reader, names the I/O path
    seconds = loader.load(unit, buf)                   # buf: uint8 tensor, host or CUDA memory
    loader.io_path                                     # "gds", "compat", "posix" or "buffered"
    loader.bytes_read                                  # bytes read from storage so far
    loader.close()

The reader follows the destination: on the CPU, O_DIRECT `preadv` (HostReader); on CUDA with
KvikIO, cuFile straight into device memory (CudaReader); on CUDA without KvikIO, O_DIRECT into a
host bounce buffer (one per thread, sized for the largest unit), then one copy. The first load of
each unit is checksummed where it landed (`verify_unit`): a unit that read back right once is
trusted afterwards. `load` may be called from several threads at once (the I/O worker does).
A model whose units carry the older order-blind checksum (sum64) is still verified with it, and
a one-line warning asks to re-convert it (once per model and process).
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from gdsllm.format.metadata import ModelMeta, UnitMeta, checksum_warning, verify_unit
from gdsllm.format.storage import CudaReader, HostReader, kvikio_module, aligned_host_buffer, probe_io_path

log = logging.getLogger("gdsllm.loader")
_warned: set = set()  # model roots told to re-convert, in this process


class UnitLoader:
    def __init__(self, meta: ModelMeta, device: str | torch.device, direct: bool = True,
                 threads: int = 8):
        self.meta = meta
        warning = checksum_warning(meta)
        if warning and meta.root not in _warned:
            _warned.add(meta.root)
            log.warning(warning)
        if torch.device(device).type == "cuda" and kvikio_module() is not None:
            self.reader = CudaReader(direct=direct, threads=threads)
            self.io_path = self.reader.path
        else:  # the CPU, or CUDA without KvikIO (read into host memory, then copy)
            self.reader = HostReader(direct=direct, threads=threads)
            self.io_path = probe_io_path("cpu", direct)
        self.verified: set[int] = set()  # units whose checksum matched once
        self.bytes_read = 0
        self._local = threading.local()
        self._lock = threading.Lock()

    def load(self, unit: UnitMeta, buf: torch.Tensor, target=None) -> float:
        """Read `unit` into `buf[:unit.nbytes]` (a 1-D uint8 tensor) and verify it on its first
        load; returns the seconds the read took. `target`: what the reader writes into when that
        is not `buf` itself (the CUDA arena hands KvikIO a CuPy array over the same bytes).
        Raises OSError (unreadable or short file) or FormatError (checksum), naming the file."""
        path, n = self.meta.path(unit), unit.nbytes
        t0 = time.perf_counter()
        if isinstance(self.reader, HostReader) and buf.device.type == "cuda":
            host = self._bounce()
            self.reader.read(path, host, n)
            buf[:n].copy_(host[:n])
        else:
            self.reader.read(path, buf[:n] if target is None else target, n)
        seconds = time.perf_counter() - t0
        with self._lock:
            self.bytes_read += n
        if unit.index not in self.verified:
            verify_unit(self.meta, unit, buf[:n])
            self.verified.add(unit.index)
        return seconds

    def _bounce(self) -> torch.Tensor:
        host = getattr(self._local, "host", None)
        if host is None:
            host = self._local.host = aligned_host_buffer(max(u.nbytes for u in self.meta.units))
        return host

    def close(self) -> None:
        if isinstance(self.reader, HostReader):
            self.reader.close()

    def __enter__(self) -> "UnitLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
