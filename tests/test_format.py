"""The weight format on disk: alignment, checksums that catch any flipped byte, and metadata or file
damage reported as one error naming the file and the field.

    python3 -m pytest tests/test_format.py
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdsllm.format.metadata import ALIGN, FormatError, load_model_meta, verify_unit
from gdsllm.format.storage import HostReader, aligned_host_buffer
from gdsllm.convert.synth import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("fmt") / "tiny", "tiny", dtype="float32",
                 overrides={"num_key_value_heads": 1, "vocab_size": 300})


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _read(meta, u) -> torch.Tensor:
    buf = aligned_host_buffer(u.nbytes)
    with HostReader(direct=True) as r:
        assert r.read(meta.path(u), buf, u.nbytes) == u.nbytes
    return buf


def test_every_offset_and_file_aligned(tiny):
    meta = load_model_meta(tiny)
    assert [u.name for u in meta.units] == ["embed", "block.0", "block.1", "head"]
    for u in meta.units:
        assert u.nbytes % ALIGN == 0 and meta.path(u).stat().st_size == u.nbytes
        for t in u.tensors:
            assert t.offset % ALIGN == 0 and t.offset + t.nbytes <= u.nbytes
        verify_unit(meta, u, _read(meta, u))


def test_any_flipped_byte_is_detected(tiny):
    meta = load_model_meta(tiny)
    rng = random.Random(0)
    for u in meta.units:
        clean = _read(meta, u)
        ends = sorted({0, u.nbytes - 1} | {t.offset for t in u.tensors} |
                      {t.offset + t.nbytes - 1 for t in u.tensors} |
                      {t.offset + t.nbytes for t in u.tensors if t.offset + t.nbytes < u.nbytes})  # padding
        for pos in ends + [rng.randrange(u.nbytes) for _ in range(200)]:
            for flip in (0x01, 0x80, 0xFF):
                buf = clean.clone()
                buf[pos] ^= flip
                with pytest.raises(FormatError, match=re.escape(f"{meta.path(u)}: checksum ") + ".*" + re.escape(f"(unit {u.name})")):
                    verify_unit(meta, u, buf)


def _distinct_blocks(buf: torch.Tensor) -> tuple[int, int]:
    """Two 4 KiB blocks of `buf` with different bytes (so swapping them changes the file)."""
    blocks = buf.view(-1, ALIGN)
    for j in range(1, blocks.shape[0]):
        if not torch.equal(blocks[0], blocks[j]):
            return 0, j
    raise AssertionError("every block is the same")


def test_swapped_blocks_are_detected(tiny):
    """Issue 24, defect 6: the sum of words missed two swapped 4 KiB blocks; the weighted sum
    (wsum64, what synth and convert write) does not. So do two swapped words of one block."""
    meta = load_model_meta(tiny)
    assert all(u.checksum.startswith("wsum64:") for u in meta.units)
    for u in meta.units:
        clean = _read(meta, u)
        a, b = _distinct_blocks(clean)
        swapped = clean.clone().view(-1, ALIGN)
        swapped[[a, b]] = swapped[[b, a]]
        with pytest.raises(FormatError, match=re.escape(f"{meta.path(u)}: checksum ")):
            verify_unit(meta, u, swapped.view(-1))
        words = clean.clone().view(torch.int64)
        i = next(i for i in range(1, 512) if words[i] != words[0])
        words[[0, i]] = words[[i, 0]]
        with pytest.raises(FormatError, match="checksum"):
            verify_unit(meta, u, words.view(torch.uint8))


def test_an_older_model_is_verified_with_its_sum_and_told_to_reconvert(tiny, tmp_path, caplog):
    """A model written before wsum64 (units checksummed with sum64) still loads, verified with its
    own sum (a flipped byte is still caught), with one warning line asking to re-convert."""
    from gdsllm.engine.loader import UnitLoader
    from gdsllm.format.metadata import checksum
    root = _copy(tiny, tmp_path / "old")
    meta = load_model_meta(root)
    doc = json.loads((root / "metadata.json").read_text())
    for d, u in zip(doc["units"], meta.units):
        d["checksum"] = checksum(_read(meta, u), "sum64")
    (root / "metadata.json").write_text(json.dumps(doc))
    meta = load_model_meta(root)
    with caplog.at_level("WARNING", logger="gdsllm.loader"):
        for _ in range(2):
            with UnitLoader(meta, "cpu") as loader:
                for u in meta.units:
                    loader.load(u, aligned_host_buffer(u.nbytes))
    warnings = [r.getMessage() for r in caplog.records if "re-convert" in r.getMessage()]
    assert len(warnings) == 1 and "sum64" in warnings[0] and str(root) in warnings[0]
    u = meta.units[1]
    bad = _read(meta, u)
    bad[5] ^= 1
    with pytest.raises(FormatError, match="checksum sum64:"):
        verify_unit(meta, u, bad)


def test_flipped_byte_on_disk_detected_through_reader(tiny, tmp_path):
    root = _copy(tiny, tmp_path / "m")
    meta = load_model_meta(root)
    u = meta.units[2]
    data = bytearray(meta.path(u).read_bytes())
    data[-1] ^= 0x10  # the padding at the end of the file
    meta.path(u).write_bytes(bytes(data))
    with pytest.raises(FormatError, match="layer_002.bin: checksum"):
        verify_unit(meta, u, _read(meta, u))


def _damage_meta(root: Path, fn) -> None:
    doc = json.loads((root / "metadata.json").read_text())
    fn(doc)
    (root / "metadata.json").write_text(json.dumps(doc))


def _overlap(doc):
    ts = doc["units"][1]["tensors"]
    ts[1]["offset"] = ts[0]["offset"]


CASES = {
    "truncated": (lambda root: os.truncate(root / "layer_001.bin", 4096), "layer_001.bin: size 4096 bytes"),
    "missing": (lambda root: (root / "layer_003.bin").unlink(), "layer_003.bin: missing (unit head)"),
    "checksum": (lambda root: _damage_meta(root, lambda d: d["units"][0].update(checksum="sum64:" + "0" * 16)),
                 "layer_000.bin: checksum"),
    "overlap": (lambda root: _damage_meta(root, _overlap), "metadata.json: unit block.0: tensors"),
    "misaligned": (lambda root: _damage_meta(root, lambda d: d["units"][1]["tensors"][2].update(offset=4100)),
                   "unit block.0 tensor self_attn.k_proj.weight: offset 4100 is not 4096-byte aligned"),
    "arch": (lambda root: _damage_meta(root, lambda d: d.update(architecture="gpt2")),
             "metadata.json: unsupported architecture 'gpt2'"),
    "dtype": (lambda root: _damage_meta(root, lambda d: d["units"][1]["tensors"][0].update(dtype="int8")),
              "tensor input_layernorm.weight: unsupported dtype 'int8'"),
    "shape": (lambda root: _damage_meta(root, lambda d: d["config"].update(hidden_size=65)),
              "metadata.json: unit embed tensor"),
    "not_json": (lambda root: (root / "metadata.json").write_text("{"), "metadata.json: not valid JSON"),
    "no_metadata": (lambda root: (root / "metadata.json").unlink(), "metadata.json: not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_model_names_file_and_field(tiny, tmp_path, case):
    root = _copy(tiny, tmp_path / "m")
    damage, expect = CASES[case]
    damage(root)
    with pytest.raises(FormatError) as e:
        meta = load_model_meta(root)
        for u in meta.units:  # checksum damage shows where the bytes are read
            verify_unit(meta, u, _read(meta, u))
    assert expect in str(e.value) and str(root) in str(e.value), str(e.value)
    if case == "overlap":
        assert "overlap" in str(e.value)


@pytest.mark.parametrize("case", ["truncated", "overlap", "arch"])
def test_cli_info_on_damaged_model_exits_nonzero(tiny, tmp_path, case):
    root = _copy(tiny, tmp_path / "m")
    damage, expect = CASES[case]
    damage(root)
    r = subprocess.run([sys.executable, "-m", "gdsllm", "info", "-m", str(root)], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cli_info_reports_model_and_io_path(tiny):
    r = subprocess.run([sys.executable, "-m", "gdsllm", "info", "-m", str(tiny)], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    meta = load_model_meta(tiny)
    assert f"{meta.num_params:,}" in r.stdout and "float32" in r.stdout and "cpu: posix" in r.stdout
    assert "heads 4/1 kv" in r.stdout and "untied" in r.stdout
    for u in meta.units:
        assert f"{u.name:<10} {u.file:<15} {u.nbytes:>14,}" in r.stdout
