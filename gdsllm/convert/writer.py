"""Writes the GdsLLM weight format, one unit at a time, atomically.

    with ModelWriter(dst, params, dtype="float16", source="hf:/models/x") as w:
        w.add_unit({"embed_tokens.weight": emb})       # the embedding
        for i in range(n): w.add_unit(block_tensors(i))  # each decoder block
        w.add_unit({"norm.weight": n, "lm_head.weight": head})
        w.add_file("tokenizer.json", src_path_or_bytes)

With `quant="int4"` or `"int8"` (and `group_size`) the writer quantizes each unit as it comes
(gdsllm.quant.policy says which tensors); a `QTensor` passed in (a GGUF block type) is stored as
it is unless a qtype is requested; `quant_device="cuda"` quantizes on the GPU (the same bytes as
on the CPU, gdsllm.quant.rtn). Quantized tensors are laid out like the others: packed values
and their (scale, zero) pairs each at a 4 KiB-aligned offset, inside the unit's checksum.

Everything is written into a temporary directory beside `dst` and renamed into place on a clean
exit, so a crash or Ctrl-C leaves no half-written model. Only one unit is in memory at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gdsllm.format.metadata import (ALIGN, DTYPES, FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, FormatError,
                     SUPPORTED_ARCHITECTURES, CHECKSUM, LlamaParams, align_up, checksum, unit_file_name, unit_layout,
                     unit_tensor_shapes)
from gdsllm.format.metadata import QuantMeta
from gdsllm.quant.policy import prepare
from gdsllm.quant.schemes import LAYOUTS, QTensor


class ModelWriter:
    """Context manager that writes a model directory; see the module docstring."""

    def __init__(self, dst: str | os.PathLike, params: LlamaParams, dtype: str, *,
                 chat_template: str | None = None, source: str = "", overwrite: bool = False,
                 architecture: str = "llama", quant: str | None = None, group_size: int = 64,
                 quant_device: str | None = None):
        from gdsllm.quant.policy import target_qtype
        target_qtype("", quant)  # ValueError on an unknown --quant, before anything is written
        self.quant, self.group_size, self.quant_device = quant, group_size, quant_device
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture must be one of {SUPPORTED_ARCHITECTURES}, got {architecture!r}")
        self.architecture = architecture
        self.dst = Path(dst).expanduser().resolve()
        if self.dst.exists() and not overwrite:
            raise FileExistsError(f"{self.dst}: already exists (remove it or pick another path)")
        self.params, self.dtype = params, dtype
        self.chat_template, self.source = chat_template, source
        self._layout = unit_layout(params)
        self._units: list[dict] = []
        self._extra: dict[str, str] = {}
        self._tokenizer_file: str | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> "ModelWriter":
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        os.chmod(self._tmp, 0o755)  # mkdtemp makes it 0700; a model is read by other users too
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    @property
    def next_unit(self) -> tuple[str, str, int | None]:
        """(name, kind, layer) of the unit `add_unit` expects next."""
        return self._layout[len(self._units)]

    def add_unit(self, tensors: dict[str, torch.Tensor | QTensor]) -> None:
        """Write the next unit; float tensors are cast to the model dtype (or quantized, see
        `quant`) and everything is laid out 4 KiB-aligned."""
        assert self._tmp is not None, "use ModelWriter as a context manager"
        if len(self._units) >= len(self._layout):
            raise FormatError(f"{self.dst}: more units than the {len(self._layout)} the model has")
        name, kind, layer = self.next_unit
        expected = unit_tensor_shapes(self.params, kind)
        if sorted(tensors) != sorted(expected):
            raise FormatError(f"unit {name}: got tensors {sorted(tensors)}, expected {sorted(expected)}")
        dt = DTYPES[self.dtype]
        offset, entries, blobs = 0, [], []
        for tname in expected:  # canonical order, so files are reproducible
            t = prepare(tname, tensors[tname], self.quant, self.group_size, f"unit {name}",
                        device=self.quant_device)
            if tuple(t.shape) != expected[tname]:
                raise FormatError(f"unit {name} tensor {tname}: shape {tuple(t.shape)}, "
                                  f"expected {expected[tname]}")
            if isinstance(t, QTensor):
                data, scales = (x.cpu() for x in t.packed())
                sc_off = align_up(offset + data.numel() * data.element_size())
                q = QuantMeta(t.qtype, t.group_size, LAYOUTS[t.qtype][0], sc_off,
                              scales.numel() * scales.element_size())
                entries.append({"name": tname, "dtype": t.qtype, "shape": list(t.shape),
                                "offset": offset, "nbytes": data.numel() * data.element_size(),
                                "quant": q.to_json()})
                blobs += [(offset, data), (sc_off, scales)]
                offset = align_up(sc_off + q.scales_nbytes)
                continue
            src = t.detach().to("cpu", dt).contiguous().reshape(-1)
            nbytes = src.numel() * src.element_size()
            entries.append({"name": tname, "dtype": self.dtype, "shape": list(t.shape),
                            "offset": offset, "nbytes": nbytes})
            blobs.append((offset, src))
            offset = align_up(offset + nbytes)
        size = max(offset, ALIGN)
        buf = torch.zeros(size, dtype=torch.uint8)
        for off, src in blobs:
            raw = src.contiguous().reshape(-1).view(torch.uint8)
            buf[off: off + raw.numel()] = raw
        index = len(self._units)
        fname = unit_file_name(index)
        _write_file(self._tmp / fname, memoryview(buf.numpy()))
        self._units.append({"index": index, "name": name, "kind": kind, "layer": layer,
                            "file": fname, "nbytes": size, "checksum": checksum(buf),
                            "tensors": entries})

    def add_file(self, name: str, content: bytes | str | os.PathLike, *, tokenizer: bool = False) -> None:
        """Copy a small side file (tokenizer, config) into the model; recorded with a checksum."""
        assert self._tmp is not None
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        (self._tmp / name).write_bytes(data)
        pad = data + b"\0" * (-len(data) % 8)
        self._extra[name] = checksum(torch.frombuffer(bytearray(pad), dtype=torch.uint8)) if pad else f"{CHECKSUM}:{0:016x}"
        if tokenizer:
            self._tokenizer_file = name

    def _finish(self) -> None:
        assert self._tmp is not None
        if len(self._units) != len(self._layout):
            raise FormatError(f"{self.dst}: wrote {len(self._units)} of {len(self._layout)} units")
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "architecture": self.architecture,
               "source": self.source, "dtype": self.dtype, "config": _params_json(self.params),
               "tokenizer_file": self._tokenizer_file, "chat_template": self.chat_template,
               "extra_files": self._extra, "alignment": ALIGN, "units": self._units}
        (self._tmp / METADATA_FILE).write_text(json.dumps(doc, indent=1))
        if self.dst.exists():  # overwrite=True: swap the old directory out, then remove it
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.rename(self.dst, old)
            os.rename(self._tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self._tmp, self.dst)


def _params_json(params: LlamaParams) -> dict:
    d = dataclasses.asdict(params)
    d["eos_token_ids"] = list(params.eos_token_ids)
    d["layer_types"] = list(params.layer_types)
    return d


def _write_file(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = data.cast("B")
        while view:
            n = os.write(fd, view)
            view = view[n:]
        # Flush and drop the written pages from the page cache: weights are read back with
        # O_DIRECT, and a freshly written model must not sit in RAM looking "warm".
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def unit_progress(it, total: int, desc: str, enabled: bool):
    """`it`, with a progress bar of units on stderr when `enabled` (every converter's bar)."""
    if not enabled:
        return it
    from tqdm import tqdm  # stderr by default
    return tqdm(it, total=total, desc=desc, unit="unit")
