"""gdsllm.torch, the PyTorch frontend: `gds_tensor` byte for byte against plain file reads at any
offset, `open_model`'s views against the bytes on disk and their lifetimes, `stream_layers`'s
order, prefetch window, buffer reuse and release, and the one-line errors. GPU: `gds_tensor` on
CUDA leaves the page cache untouched, and its GB/s beside the runtime reader's on the same file.
"""
from __future__ import annotations

import gc
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gdsllm.convert.synth import synth
from gdsllm.format.metadata import ALIGN, DTYPES, FormatError, load_model_meta
from gdsllm.format.storage import CHUNK
from gdsllm.quant.schemes import QuantWeight
from gdsllm.torch import Unit, gds_tensor, io_path, open_model, stream_layers
from gdsllm.service.benchmark import evict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("torchfe") / "tiny", "tiny", layers=3, dtype="float32")


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("torchfe") / "int8", "tiny", layers=2, dtype="float16",
                 quant="int8", group_size=16)


def _bytes_file(path: Path, n: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def _expected(data: bytes, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.from_numpy(np.frombuffer(data[offset: offset + n], dtype=np.uint8).copy())
    return raw.view(dtype).view(shape)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _stream_threads() -> int:
    return sum(t.name == "gdsllm-stream-layers" for t in threading.enumerate())


# ------------------------------------------------------------------ gds_tensor


@pytest.mark.parametrize("offset,shape,dtype", [
    (0, (3, 4096), torch.uint8),                  # aligned start, aligned length
    (1, (7, 5), torch.float32),                   # unaligned start: a copy (not element-aligned)
    (4095, (2, 3), torch.float16),                # the range straddles a 4 KiB boundary
    (4096 + 8, (129,), torch.int64),              # element-aligned inside the cover: a view
    (12_288 + 100, (11,), torch.bfloat16),        # ends 3 bytes before the unpadded end of file
    (12_288 + 100 + 19, (3,), torch.uint8),       # ends exactly at the end of the file
    (5, (), torch.float64),                       # a scalar
    (12_000, (0, 4), torch.float32),              # nothing to read
])
def test_gds_tensor_matches_plain_reads(tmp_path, offset, shape, dtype):
    path = tmp_path / "blob.bin"
    data = _bytes_file(path, 3 * ALIGN + 123)  # not padded: the last block is partial
    t = gds_tensor(path, shape, dtype, offset=offset, device="cpu")
    assert t.device.type == "cpu" and t.shape == torch.Size(shape) and t.dtype == dtype
    assert _same_bytes(t, _expected(data, offset, shape, dtype))
    assert t.data_ptr() % dtype.itemsize == 0


def test_gds_tensor_multi_chunk_range_and_string_dtype(tmp_path):
    """A range longer than one read request (CHUNK), unaligned at both ends."""
    path = tmp_path / "big.bin"
    data = _bytes_file(path, CHUNK + 3 * ALIGN + 77, seed=1)
    n = (CHUNK + 2 * ALIGN) // 2
    t = gds_tensor(path, (n,), "float16", offset=ALIGN + 2, device="cpu")
    assert _same_bytes(t, _expected(data, ALIGN + 2, (n,), torch.float16))
    assert io_path("cpu") == "posix"


def test_gds_tensor_cpu_leaves_the_page_cache_alone(tmp_path):
    """O_DIRECT on the CPU: reading an unaligned range of a file that is not in the page cache
    leaves none of its pages there (fincore, else mincore)."""
    from gdsllm.service.benchmark import cached_bytes
    path = tmp_path / "blob.bin"
    data = _bytes_file(path, 8 << 20, seed=2)
    evict(path)
    before = cached_bytes(path)
    if before:
        pytest.skip(f"posix_fadvise(DONTNEED) left {before} bytes of {path} cached")
    t = gds_tensor(path, ((8 << 20) - 3 * ALIGN,), torch.uint8, offset=ALIGN + 17, device="cpu")
    assert cached_bytes(path) == 0
    assert _same_bytes(t, _expected(data, ALIGN + 17, ((8 << 20) - 3 * ALIGN,), torch.uint8))


def test_gds_tensor_errors_name_the_file(tmp_path):
    path = tmp_path / "blob.bin"
    _bytes_file(path, 2 * ALIGN)
    cases = [
        (dict(path=tmp_path / "missing.bin", shape=(4,), dtype=torch.uint8), FileNotFoundError),
        (dict(path=path, shape=(2 * ALIGN + 1,), dtype=torch.uint8), ValueError),  # past the end
        (dict(path=path, shape=(4,), dtype=torch.float32, offset=2 * ALIGN - 8), ValueError),
        (dict(path=path, shape=(4,), dtype=torch.uint8, offset=-1), ValueError),
        (dict(path=tmp_path, shape=(4,), dtype=torch.uint8), ValueError),  # a directory
    ]
    for kw, exc in cases:
        with pytest.raises(exc) as e:
            gds_tensor(device="cpu", **kw)
        msg = str(e.value)
        assert str(kw["path"]) in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match="shape must be non-negative"):
        gds_tensor(path, (-1, 2), torch.uint8, device="cpu")
    with pytest.raises(ValueError, match=f"{path}: device must be cpu or cuda, got 'meta'"):
        gds_tensor(path, (2,), torch.uint8, device="meta")
    with pytest.raises(ValueError, match="not a torch dtype: 'floaty'"):
        gds_tensor(path, (2,), "floaty", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=f"{path}: device cuda: no CUDA GPU"):
            gds_tensor(path, (2,), torch.uint8)  # the default device is cuda


# ------------------------------------------------------------------ open_model


def _file_tensor(meta, unit, t) -> torch.Tensor:
    raw = meta.path(unit).read_bytes()[t.offset: t.offset + t.nbytes]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(DTYPES[t.dtype]).view(t.shape)


def test_open_model_views_equal_the_files(tiny):
    meta = load_model_meta(tiny)
    with open_model(tiny, device="cpu") as m:
        assert m.io_path == "posix" and m.unit_names == [u.name for u in meta.units]
        for u in meta.units:
            unit = m[u.name]
            assert isinstance(unit, Unit) and unit.name == u.name and sorted(unit) == sorted(
                t.name for t in u.tensors)
            for t in u.tensors:
                assert torch.equal(unit[t.name], _file_tensor(meta, u, t)), (u.name, t.name)
        assert m.bytes_read == meta.total_bytes
        assert m.loaded == [u.name for u in meta.units]
        assert torch.equal(m.tensor(1, "mlp.up_proj.weight"), m["block.0"]["mlp.up_proj.weight"])


def test_open_model_quantized_weights_dequantize(tiny_int8):
    """int8 QuantWeights: the packed values and scales are the file's bytes, and dequantize() is
    q * s + z per group, computed here from the file."""
    meta = load_model_meta(tiny_int8)
    u = meta.units[1]
    with open_model(tiny_int8, device="cpu") as m:
        unit = m["block.0"]
        quant = [t for t in u.tensors if t.quant is not None]
        assert quant
        for t in quant:
            w = unit[t.name]
            assert isinstance(w, QuantWeight) and w.qtype == "int8"
            raw = meta.path(u).read_bytes()
            q = torch.frombuffer(bytearray(raw[t.offset: t.offset + t.nbytes]), dtype=torch.int8).view(t.shape)
            sc = torch.frombuffer(bytearray(raw[t.quant.scales_offset: t.quant.scales_offset + t.quant.scales_nbytes]),
                                  dtype=torch.float16).view(t.shape[1] // t.quant.group_size, t.shape[0], 2)
            s = sc[..., 0].t().float().repeat_interleave(t.quant.group_size, 1)
            z = sc[..., 1].t().float().repeat_interleave(t.quant.group_size, 1)
            assert torch.equal(w.data, q)
            assert torch.allclose(w.dequantize(torch.float32), q.float() * s + z, rtol=0, atol=1e-6)


def test_open_model_lifetimes(tiny):
    m = open_model(tiny, device="cpu")
    first = m["block.1"]
    assert m["block.1"] is first and m.loaded == ["block.1"]
    m.release("block.1")
    assert first.released and m.loaded == []
    with pytest.raises(RuntimeError, match=r"unit block.1 \(.*layer_002.bin\) was released"):
        first["mlp.up_proj.weight"]
    again = m["block.1"]  # read again into a new buffer
    assert again is not first and not again.released
    with again:
        pass
    assert again.released and m.loaded == []
    m["embed"], m["head"]
    m.release()
    assert m.loaded == []
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m["embed"]
    with open_model(tiny, device="cpu") as m2:
        u = m2["head"]
    assert u.released


def test_open_model_errors(tiny, tmp_path):
    with open_model(tiny, device="cpu") as m:
        with pytest.raises(KeyError, match=r"no unit 'block.9' \(it has 5 units, embed \.\. head\)"):
            m["block.9"]
        with pytest.raises(KeyError, match=r"unit block.0 \(.*layer_001.bin\) has no tensor 'nope'"):
            m["block.0"]["nope"]
    with pytest.raises(FileNotFoundError, match="nothing: no such model directory"):
        open_model(tmp_path / "nothing", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"empty: not a GdsLLM model directory \(no metadata.json\)"):
        open_model(tmp_path / "empty", device="cpu")
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        open_model(tiny, device="meta")
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    data = bytearray((bad / "layer_002.bin").read_bytes())
    data[100] ^= 0x40
    (bad / "layer_002.bin").write_bytes(bytes(data))
    with open_model(bad, device="cpu") as m:
        m["block.0"]
        with pytest.raises(FormatError, match="layer_002.bin: checksum"):
            m["block.1"]


# ------------------------------------------------------------------ stream_layers


def test_stream_layers_order_and_tensors(tiny):
    meta = load_model_meta(tiny)
    names = []
    with open_model(tiny, device="cpu") as m:
        for unit in stream_layers(tiny, device="cpu"):
            names.append(unit.name)
            for name, t in unit.items():
                assert torch.equal(t, m[unit.name][name]), (unit.name, name)
    assert names == [u.name for u in meta.units]
    assert _stream_threads() == 0  # a stream run to its end stops its thread
    picked = [u.name for u in stream_layers(tiny, device="cpu", units=["head", 0, "block.2"])]
    assert picked == ["head", "embed", "block.2"]


def test_stream_layers_prefetch_window(tiny):
    """With window W, W units are read ahead of the one in hand, never more: W + 1 buffers,
    reused round-robin; a buffer is refilled only once the loop moved past its unit."""
    meta = load_model_meta(tiny)
    n, W = len(meta.units), 2
    s = stream_layers(tiny, window=W, device="cpu")
    assert s.window == W and s.buffers == W + 1 and s.io_path == "posix"
    seen, ptrs = [], []
    for i, unit in enumerate(s):
        # while the loop holds unit i, the reader fills the other W buffers and stops there
        _wait(lambda: s.units_read == min(n, i + 1 + W), f"units {i + 1}..{i + W} to be read")
        assert s.units_read <= s.units_yielded + W and s.prefetched == s.units_read - (i + 1)
        ptrs.append(next(iter(unit.values())).data_ptr() - unit.meta.tensors[0].offset)
        if seen:
            with pytest.raises(RuntimeError, match="was released"):
                seen[-1][seen[-1].meta.tensors[0].name]
            assert seen[-1].released
        seen.append(unit)
    assert len(set(ptrs)) == W + 1 and ptrs == [ptrs[i % (W + 1)] for i in range(n)]  # round-robin
    assert seen[-1].released and s.bytes_read == meta.total_bytes


def test_stream_layers_budget_and_early_release(tiny):
    meta = load_model_meta(tiny)
    slot = max(u.nbytes for u in meta.units)
    s = stream_layers(tiny, budget=2 * slot + 100, window=4, device="cpu")
    assert s.buffers == 2 and s.window == 1
    s.close()
    # window 0: one buffer; the next unit is read only once the one in hand is released
    s = stream_layers(tiny, window=0, device="cpu")
    first = next(s)
    _wait(lambda: s.units_read == 1, "the first unit")
    assert s.units_read == 1  # the only buffer is in the loop's hands: nothing else can be read
    first.release()
    _wait(lambda: s.units_read == 2, "the second unit after release")
    assert next(s).name == "block.0"
    s.close()
    assert _stream_threads() == 0
    with pytest.raises(ValueError, match=f"holds no buffer for unit block.0 \\({slot} bytes\\)"):
        stream_layers(tiny, budget=slot - 1, device="cpu")
    with pytest.raises(ValueError, match="not a size"):
        stream_layers(tiny, budget="lots", device="cpu")
    with pytest.raises(ValueError, match="window must be a non-negative"):
        stream_layers(tiny, window=-1, device="cpu")


def test_stream_layers_stops_when_left(tiny):
    with stream_layers(tiny, device="cpu") as s:
        next(s)
    assert _stream_threads() == 0 and not list(s)
    for unit in stream_layers(tiny, window=1, device="cpu"):  # a loop left early, no `with`
        break
    del unit
    gc.collect()
    _wait(lambda: _stream_threads() == 0, "the abandoned stream's thread to stop")


def test_stream_layers_errors(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    data = bytearray((bad / "layer_003.bin").read_bytes())
    data[-1] ^= 0x01
    (bad / "layer_003.bin").write_bytes(bytes(data))
    got = []
    with pytest.raises(FormatError, match="layer_003.bin: checksum"):
        for unit in stream_layers(bad, device="cpu"):
            got.append(unit.name)
    assert got == ["embed", "block.0", "block.1"]
    assert _stream_threads() == 0
    with pytest.raises(KeyError, match="no unit 'block.7'"):
        stream_layers(tiny, units=["block.7"], device="cpu")
    with pytest.raises(FileNotFoundError, match="none: no such model directory"):
        stream_layers(tmp_path / "none", device="cpu")


# ------------------------------------------------------------------ GPU (device)


def _best_gbps(fn, nbytes: int, runs: int = 2) -> float:
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


@pytest.mark.gpu
def test_gds_tensor_cuda_bypasses_page_cache_and_reads_at_the_runtimes_speed(tmp_path):
    """A 2 GiB file, evicted from the page cache: gds_tensor reads unaligned ranges of it into
    VRAM, the bytes are right, and none of the file's pages enters the page cache (fincore, else
    mincore: gdsllm.service.benchmark.cached_bytes). Its GB/s is printed beside the runtime
    reader's (CudaReader, what UnitLoader uses on CUDA) on the same file, best of two each."""
    from gdsllm.format.storage import CudaReader
    from gdsllm.service.benchmark import cached_bytes, meminfo_cached
    assert io_path("cuda") in ("gds", "compat"), "gds_tensor on CUDA needs KvikIO (pip install 'gdsllm[cuda]')"
    path = tmp_path / "big.bin"
    n = 2 << 30
    pattern = torch.arange(n // 8, dtype=torch.int64)  # every 8-byte word holds its own index
    with open(path, "wb") as f:
        f.write(pattern.numpy().tobytes())
    evict(path)
    before, before_cached = cached_bytes(path), meminfo_cached()
    if before > n // 100:
        pytest.skip(f"posix_fadvise(DONTNEED) left {before} bytes of {path} cached")
    gds_tensor(path, (ALIGN,), torch.uint8, offset=0)  # KvikIO's first use: its threads, context
    offset, count = 8 * 1001 + 3, n - 2 * 8 * 1001  # unaligned at both ends
    t = gds_tensor(path, (count,), torch.uint8, offset=offset)
    assert t.device.type == "cuda" and torch.equal(t, pattern.cuda().view(torch.uint8)[offset: offset + count])
    del t
    words = gds_tensor(path, (count // 8,), torch.int64, offset=8 * 1001)
    assert torch.equal(words, torch.arange(1001, 1001 + count // 8, dtype=torch.int64, device="cuda"))
    del words
    gds_gbps = _best_gbps(lambda: gds_tensor(path, (count,), torch.uint8, offset=offset), count)
    after, after_cached = cached_bytes(path), meminfo_cached()
    assert after <= before, (before, after)
    buf = torch.empty(n, dtype=torch.uint8, device="cuda")
    reader = CudaReader(direct=True)
    runtime_gbps = _best_gbps(lambda: reader.read(path, buf, n), n)
    print(f"\ngds_tensor ({io_path('cuda')}): {gds_gbps:.2f} GB/s; runtime reader (CudaReader, whole "
          f"file): {runtime_gbps:.2f} GB/s; the file's pages cached before {before}, after {after} "
          f"bytes; /proc/meminfo page cache {(after_cached - before_cached) / 1e6:+.1f} MB")


@pytest.mark.gpu
def test_open_model_and_stream_layers_on_cuda(tiny):
    """On CUDA the same views land in VRAM (KvikIO), equal to the CPU's; the stream's buffers are
    refilled only after the work queued on the previous unit is done."""
    with open_model(tiny, device="cpu") as cpu:
        with open_model(tiny, device="cuda") as gpu:
            assert gpu.io_path in ("gds", "compat")
            for name in cpu.unit_names:
                for k, v in cpu[name].items():
                    assert gpu[name][k].device.type == "cuda" and torch.equal(gpu[name][k].cpu(), v)
        names = []
        for unit in stream_layers(tiny, window=1, device="cuda"):
            names.append(unit.name)
            for k, v in unit.items():
                assert torch.equal((v * 1).cpu(), cpu[unit.name][k]), (unit.name, k)  # a kernel, then a copy
        assert names == cpu.unit_names
