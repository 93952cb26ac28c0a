"""The slot arena: one allocation, owned by the compute worker (which runs over it) and shared
with the I/O worker (which fills it).

    with Arena.create("cpu", nbytes) as arena:        # owner: POSIX shm, or one cudaMalloc
        spec = arena.spec                             # ArenaSpec(backend, handle, nbytes): travels
                                                      # as ComputeReady/AttachArena fields, never the bytes
        with Arena.attach(spec) as peer:              # in another process
            w = peer.view(offset, n)                  # torch uint8 tensor over the arena bytes

CPU backend: `multiprocessing.shared_memory` (page aligned, so O_DIRECT reads can land in it);
the owner unlinks it on close, so no /dev/shm entry outlives the service. CUDA backend: one
`cupy.cuda.runtime.malloc` (not CuPy's pool: pool blocks cannot be exported safely) exported with
`ipcGetMemHandle` and opened with `ipcOpenMemHandle`; torch sees it through
`__cuda_array_interface__`. Only the owner frees; an attacher closes its mapping, and must do so
before the owner frees (the service stops the I/O worker, the attacher, first).
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from .worker_messages import ARENA_BACKENDS as BACKENDS
from .worker_messages import shm_prefix


class ArenaError(RuntimeError):
    """The arena could not be created or opened (names the backend and the handle)."""


@dataclass(frozen=True)
class ArenaSpec:
    """How to open an arena from another process: `handle` is the shm name (UTF-8) on "cpu",
    the 64-byte cudaIpcMemHandle on "cuda"."""

    backend: str
    handle: bytes
    nbytes: int
    device: int = 0

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ArenaError(f"unknown arena backend {self.backend!r}; expected one of {BACKENDS}")
        if self.nbytes <= 0:
            raise ArenaError(f"arena size must be positive, got {self.nbytes}")


class Arena:
    """A byte arena with a torch uint8 view (`.tensor`); use `create` / `attach`, then `close`."""

    spec: ArenaSpec
    tensor: torch.Tensor
    owner: bool

    @staticmethod
    def create(backend: str, nbytes: int, device: int = 0) -> "Arena":
        if backend == "cpu":
            return _ShmArena.create(nbytes)
        if backend == "cuda":
            return _CudaArena.create(nbytes, device)
        raise ArenaError(f"unknown arena backend {backend!r}; expected one of {BACKENDS}")

    @staticmethod
    def attach(spec: ArenaSpec) -> "Arena":
        return _ShmArena.attach(spec) if spec.backend == "cpu" else _CudaArena.attach(spec)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """uint8 tensor over arena bytes [offset, offset + nbytes); ValueError if out of range."""
        check_range(offset, nbytes, self.spec.nbytes)
        return self.tensor[offset: offset + nbytes]

    def read_target(self, offset: int, nbytes: int):
        """What a reader writes into: the torch view on CPU, a CuPy array on CUDA (for KvikIO)."""
        return self.view(offset, nbytes)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Arena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_range(offset: int, nbytes: int, total: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > total:
        raise ValueError(f"arena range [{offset}, {offset + nbytes}) is outside the {total}-byte arena")


class _ShmArena(Arena):
    def __init__(self, shm: shared_memory.SharedMemory, nbytes: int, owner: bool):
        self.shm, self.owner = shm, owner
        self.spec = ArenaSpec("cpu", shm.name.encode(), nbytes)
        self.tensor = torch.frombuffer(shm.buf, dtype=torch.uint8)[:nbytes]
        self._closed = False

    @classmethod
    def create(cls, nbytes: int) -> "_ShmArena":
        if nbytes <= 0:
            raise ArenaError(f"arena size must be positive, got {nbytes}")
        name = f"{shm_prefix(os.getpid())}{secrets.token_hex(4)}"
        try:
            shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)
        except OSError as e:
            raise ArenaError(f"cannot create a {nbytes}-byte shared-memory arena /dev/shm/{name}: "
                             f"{e.strerror or e}") from None
        return cls(shm, nbytes, owner=True)

    @classmethod
    def attach(cls, spec: ArenaSpec) -> "_ShmArena":
        try:
            name = spec.handle.decode()
        except UnicodeDecodeError:
            raise ArenaError(f"shared-memory arena handle {spec.handle[:32]!r} is not a name") from None
        if not name or "/" in name:
            raise ArenaError(f"bad shared-memory arena name {name!r}")
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except OSError as e:
            raise ArenaError(f"cannot open shared-memory arena /dev/shm/{name}: {e.strerror or e}") from None
        if shm.size < spec.nbytes:
            shm.close()
            raise ArenaError(f"shared-memory arena /dev/shm/{name} has {shm.size} bytes, "
                             f"expected {spec.nbytes}")
        return cls(shm, spec.nbytes, owner=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        del self.tensor
        try:
            self.shm.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes with it; unlinking still works
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class _CudaArena(Arena):
    """One cudaMalloc'd block; needs CuPy. Viewed by torch via __cuda_array_interface__."""

    def __init__(self, cupy, ptr: int, spec: ArenaSpec, owner: bool):
        self.cupy, self.ptr, self.spec, self.owner = cupy, ptr, spec, owner
        mem = cupy.cuda.UnownedMemory(ptr, spec.nbytes, self, spec.device)
        self.array = cupy.ndarray((spec.nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        self.tensor = torch.as_tensor(self.array, device=f"cuda:{spec.device}")
        self._closed = False

    @staticmethod
    def _cupy():
        try:
            import cupy
            return cupy
        except Exception as e:
            raise ArenaError(f"the CUDA arena needs CuPy (pip install 'gdsllm[cuda]'): {e}") from None

    @classmethod
    def create(cls, nbytes: int, device: int) -> "_CudaArena":
        cupy = cls._cupy()
        if nbytes <= 0:
            raise ArenaError(f"arena size must be positive, got {nbytes}")
        with cupy.cuda.Device(device):
            try:
                ptr = cupy.cuda.runtime.malloc(nbytes)
            except Exception as e:
                raise ArenaError(f"cannot allocate a {nbytes}-byte arena on cuda:{device}: {e}") from None
            handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
            return cls(cupy, ptr, ArenaSpec("cuda", handle, nbytes, device), owner=True)

    @classmethod
    def attach(cls, spec: ArenaSpec) -> "_CudaArena":
        cupy = cls._cupy()
        with cupy.cuda.Device(spec.device):
            try:
                ptr = cupy.cuda.runtime.ipcOpenMemHandle(spec.handle)
            except Exception as e:
                raise ArenaError(f"cannot open the CUDA IPC arena on cuda:{spec.device}: {e}") from None
            return cls(cupy, ptr, spec, owner=False)

    def read_target(self, offset: int, nbytes: int):
        check_range(offset, nbytes, self.spec.nbytes)
        return self.array[offset: offset + nbytes]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        del self.tensor, self.array
        with self.cupy.cuda.Device(self.spec.device):
            self.cupy.cuda.runtime.deviceSynchronize()  # no kernel may still touch the block
            if self.owner:
                self.cupy.cuda.runtime.free(self.ptr)
            else:
                self.cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)
