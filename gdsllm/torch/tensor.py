"""`gds_tensor`: one byte range of a file into a fresh tensor, through the runtime's own readers.

    t = gds_tensor("/data/w.bin", (4096, 4096), torch.float16, offset=8192)   # CUDA by default
    io_path("cuda")          # "gds", "compat" or "posix": the path that read took

The readers are gdsllm.format.storage's, the ones every unit of the runtime goes through: on CUDA,
KvikIO `CuFile.pread` straight into device memory (`gds` with nvidia-fs, else `compat`: O_DIRECT
through pinned bounce buffers, `auto_direct_io_read` on); on the CPU, and on CUDA without KvikIO,
O_DIRECT `preadv` into page-aligned host memory (`posix`; then one copy to the GPU). Neither
passes through the page cache. O_DIRECT needs 4 KiB-aligned offsets and lengths, so an unaligned
range is read as its aligned cover (at most 4 KiB more on each side, never past the end of the
file) and sliced: the result is a view when the slice lands on the dtype's alignment, else a copy.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch

from gdsllm.format.metadata import ALIGN, align_up
from gdsllm.format.storage import CudaReader, HostReader, aligned_host_buffer, probe_io_path


def io_path(device: str | torch.device = "cuda") -> str:
    """The path `gds_tensor` takes on `device`: "gds", "compat" (CUDA) or "posix"."""
    return probe_io_path(torch.device(device).type)


@functools.lru_cache(maxsize=None)
def _reader(kind: str) -> HostReader | CudaReader:
    """One reader per process and kind ("host", "cuda"), as the runtime keeps one per loader."""
    return CudaReader(direct=True) if kind == "cuda" else HostReader(direct=True)


os.register_at_fork(after_in_child=_reader.cache_clear)  # a reader's threads stay in the parent


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"gds_tensor: not a torch dtype: {dtype!r}")
    return dt


def _shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"gds_tensor: shape must be non-negative integers, got {shape!r}")
    return shape


def gds_tensor(path: str | os.PathLike, shape, dtype: torch.dtype | str, offset: int = 0,
               device: str | torch.device = "cuda") -> torch.Tensor:
    """A new tensor of `shape` and `dtype` on `device`, holding the bytes of `path` from `offset`
    (any byte offset) on, read as the runtime reads its units (see the module). Raises
    FileNotFoundError / OSError (unreadable, short file) or ValueError (bad argument, a range past
    the end of the file), each one line naming the file."""
    path = Path(path).expanduser()
    shape, dtype = _shape(shape), _dtype(dtype)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{path}: offset must be a non-negative integer, got {offset!r}")
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{path}: device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{path}: device {dev}: no CUDA GPU is available to torch")
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise OSError(e.errno, f"{path}: {e.strerror}") from None
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    if offset + nbytes > size:
        raise ValueError(f"{path}: bytes {offset}..{offset + nbytes} ({tuple(shape)} of "
                         f"{str(dtype).removeprefix('torch.')}) run past the end of the file "
                         f"({size} bytes)")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=dev)
    start = offset // ALIGN * ALIGN
    head = offset - start
    # the aligned cover, clipped at the end of the file (a read past it would come back short)
    length = min(align_up(head + nbytes), size - start)
    if dev.type == "cuda" and io_path(dev) != "posix":
        cover = torch.empty(align_up(length), dtype=torch.uint8, device=dev)
        try:
            _reader("cuda").read(path, cover, length, start)
        except RuntimeError as e:  # KvikIO's own errors: keep one line, name the file
            raise OSError(f"{path}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
    else:
        cover = aligned_host_buffer(align_up(length))
        _reader("host").read(path, cover, length, start)
        if dev.type != "cpu":
            cover = cover.to(dev)
    raw = cover[head: head + nbytes]
    if head % dtype.itemsize:  # a typed view needs an element-aligned address: copy instead
        raw = raw.clone()
    return raw.view(dtype).view(shape)
