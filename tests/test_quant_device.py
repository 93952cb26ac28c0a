"""Quantization gives the same bytes wherever it runs (gdsllm.quant.rtn): independent of the chunk
of rows, the thread count and (GPU tests) the device; `gdsllm convert --device`.
"""
from __future__ import annotations

import filecmp
import subprocess
import sys

import pytest
import torch

from gdsllm.convert.synth import synth
from gdsllm.quant import rtn
from gdsllm.quant.int4pack import pack_int4, unpack_int4


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Normal weights with outliers, a constant group and a group of two values (the edge cases
    of the scale: zero range, and a refit with codes at both ends only)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 1e-3] *= 40
    w[0, :32] = 0.125
    w[1, :32] = torch.tensor([-0.5, 0.5]).repeat(16)
    return w.to(torch.bfloat16)


def same(a, b) -> bool:
    return (a.qtype == b.qtype and torch.equal(a.q.cpu(), b.q.cpu())
            and torch.equal(a.scale.cpu(), b.scale.cpu()) and torch.equal(a.zero.cpu(), b.zero.cpu()))


@pytest.mark.parametrize("qtype,group", [("int4", 32), ("int4", 128), ("int8", 64)])
def test_quantize_does_not_depend_on_chunks_or_threads(qtype, group, monkeypatch):
    w = weight(200, 512)
    ref = rtn.quantize(w, qtype, group)
    threads = torch.get_num_threads()
    try:
        for chunk, t in [(512, 1), (3 * 512 + 7, 2), (1 << 24, 1), (1 << 24, 2)]:
            monkeypatch.setitem(rtn.CHUNK, "cpu", chunk)
            torch.set_num_threads(t)
            assert same(rtn.quantize(w, qtype, group), ref), (chunk, t)
    finally:
        torch.set_num_threads(threads)


def naive(w: torch.Tensor, qtype: str, group: int, refine: int) -> torch.Tensor:
    """The method written plainly (library means and sums): the dequantized weight."""
    n, k = w.shape
    g = w.float().reshape(n, -1, group)
    steps, mid, lo_c, hi_c = (15, 8, -8, 7) if qtype == "int4" else (255, 128, -128, 127)
    s = (g.amax(-1) - g.amin(-1)) / steps
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = g.amin(-1) + mid * s
    for _ in range(refine):
        c = torch.round((g - z[..., None]) / s[..., None]).clamp(lo_c, hi_c)
        cc, gc = c - c.mean(-1, keepdim=True), g - g.mean(-1, keepdim=True)
        var = (cc * cc).sum(-1)
        s2 = (cc * gc).sum(-1) / var.clamp_min(1e-12)
        z2 = g.mean(-1) - s2 * c.mean(-1)
        ok = (var > 0) & (s2 > 0)
        s, z = torch.where(ok, s2, s), torch.where(ok, z2, z)
    sd = rtn.SCALE_DTYPE[qtype]
    s, z = s.to(sd).float(), z.to(sd).float()
    c = torch.round((g - z[..., None]) / s[..., None]).clamp(lo_c, hi_c)
    return (c * s[..., None] + z[..., None]).reshape(n, k)


@pytest.mark.parametrize("qtype,group", [("int4", 64), ("int8", 32)])
def test_quantize_is_the_method_and_refining_helps(qtype, group):
    """Codes and scales equal the plainly written method except where a sum's rounding order
    tips a value across a rounding boundary (a handful of groups), and refinement lowers the
    error against plain round-to-nearest."""
    w = weight(256, 1024, seed=1)
    for refine in (0, rtn.REFINE):
        ours = rtn.quantize(w, qtype, group, refine=refine).dequantize()
        ref = naive(w, qtype, group, refine)
        differ = (ours != ref).float().reshape(-1, group).any(-1).float().mean()
        assert differ < 0.01, (refine, float(differ))
    err = {r: float(((rtn.quantize(w, qtype, group, refine=r).dequantize() - w.float()) ** 2).mean())
           for r in (0, rtn.REFINE)}
    assert err[rtn.REFINE] < err[0]


def pack_reference(q: torch.Tensor) -> torch.Tensor:
    """The tile layout element by element (gdsllm.quant.int4pack's docstring), for small shapes."""
    from gdsllm.quant.schemes import inner_k_tiles
    n, k = q.shape
    t = inner_k_tiles(k)
    out = torch.zeros(n // 8, k // (16 * t), 32, t // 2, dtype=torch.int64)
    for nn in range(n):
        for kk in range(k):
            odd, rest = kk % 2, kk // 2
            ko, rest = divmod(rest, 8 * t)
            j, rest = divmod(rest, 16)  # pair of k-tiles
            i, c = divmod(rest, 4)
            lane = 4 * (nn % 8) + c
            out[nn // 8, ko, lane, j] |= int(q[nn, kk]) << (4 * (4 * odd + i))
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


@pytest.mark.parametrize("shape", [(8, 64), (16, 128), (8, 256), (24, 96)])
def test_pack_int4_matches_the_layout_element_by_element(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pack_int4(q), pack_reference(q))
    assert torch.equal(unpack_int4(pack_int4(q), shape), q)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_convert_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    src = synth(tmp_path / "m", "tiny", layers=1, dtype="float32")
    r = subprocess.run([sys.executable, "-m", "gdsllm", "convert", str(src), str(tmp_path / "q"),
                        "--quant", "int4", "--device", "cuda"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "--device cuda" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q").exists()


def convert_cli(src, dst, device: str) -> None:
    r = subprocess.run([sys.executable, "-m", "gdsllm", "convert", str(src), str(dst), "--quant",
                        "int4", "--dtype", "float16", "--group-size", "64", "--device", device],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def assert_same_files(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, mismatch + errors


def test_convert_auto_device_equals_cpu(tmp_path):
    """`--device auto` and `--device cpu`: the same files (on a GPU machine: cuda against cpu)."""
    hf = tmp_path / "hf"
    synth(tmp_path / "m", "tiny", layers=2, dtype="float16", hf_out=hf,
          overrides={"hidden_size": 128, "intermediate_size": 256, "head_dim": 32})
    convert_cli(hf, tmp_path / "cpu", "cpu")
    convert_cli(hf, tmp_path / "auto", "auto")
    assert_same_files(tmp_path / "cpu", tmp_path / "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,group", [("int4", 128), ("int4", 32), ("int8", 64)])
def test_cuda_quantize_gives_the_cpu_bytes(qtype, group):
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (200, 512)]:
        w = weight(n, k, seed=n + k)
        cpu = rtn.quantize(w, qtype, group)
        cuda = rtn.quantize(w, qtype, group, device="cuda")
        assert cuda.q.device.type == "cuda"
        assert same(cpu, cuda), (n, k)
        assert all(torch.equal(x.cpu(), y) for x, y in zip(cuda.packed(), cpu.packed()))


@pytest.mark.gpu
def test_cuda_convert_writes_the_cpu_files(tmp_path):
    """`gdsllm convert --quant int4` of a Hugging Face copy with --device cpu and --device cuda:
    identical model directories, byte for byte."""
    hf = tmp_path / "hf"
    synth(tmp_path / "m", "smollm2-135m", layers=2, dtype="float16", hf_out=hf)
    convert_cli(hf, tmp_path / "cpu", "cpu")
    convert_cli(hf, tmp_path / "cuda", "cuda")
    assert_same_files(tmp_path / "cpu", tmp_path / "cuda")
