"""The GdsLLM weight format: typed, validated descriptions of a model directory.

A model directory holds `metadata.json` and one flat file per *unit* (`layer_000.bin`, ...):
the embedding, each decoder block, then the final norm with the LM head. Every tensor starts at
a 4 KiB-aligned offset and every file is padded to 4 KiB, so each unit can be read with
O_DIRECT / cuFile in one aligned request. This module only describes and checks; the writer is
`gdsllm.convert.writer`, the readers are in `gdsllm.format.storage`.

    >>> meta = load_model_meta("~/.cache/gdsllm/smollm2-135m-instruct")
    >>> meta.units[1].tensors[0].name, meta.units[1].nbytes
"""
from __future__ import annotations

import functools

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdsllm.format.family_params import FamilyParams, expert_index, family_fields, family_problem
from gdsllm.format import quant_layout
from gdsllm.format.layout import unit_layout, unit_tensor_shapes  # noqa: F401  (also imported from here)

FORMAT_NAME = "gdsllm"
FORMAT_VERSION = 2  # 2: quantized tensors (int4, int8); version 1 files (all float) still read
READABLE_VERSIONS = (1, 2)
ALIGN = 4096  # bytes; O_DIRECT and cuFile want 4 KiB-aligned offsets and lengths
METADATA_FILE = "metadata.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}
UNIT_KINDS = ("embed", "block", "head", "expert")  # "expert": one expert of a MoE block
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "mixtral", "qwen3_moe")


class FormatError(ValueError):
    """A model directory or one of its files is missing, malformed or corrupt."""


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorMeta:
    """One tensor inside a unit file: `nbytes` bytes at `offset` (bytes, 4 KiB aligned); a
    quantized one (`quant` set) has its qtype as `dtype` and its logical `shape`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    quant: "QuantMeta | None" = None

    @property
    def spans(self) -> list[tuple[int, int]]:
        """Byte ranges [start, end) of the tensor in its unit file, its scales included."""
        q = self.quant
        return [(self.offset, self.offset + self.nbytes)] + (q.spans if q else [])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class UnitMeta:
    """One unit: a file of `nbytes` bytes (padded to 4 KiB) with its tensors and checksum."""

    index: int
    name: str  # "embed", "block.0" ... "block.N-1", "head"; "block.i.expert.j" (MoE)
    kind: str  # one of UNIT_KINDS
    layer: int | None  # decoder block index for kind == "block" and "expert"
    file: str
    nbytes: int
    checksum: str
    tensors: tuple[TensorMeta, ...]

    @functools.cached_property  # read per routed expert per layer: parse the name once
    def expert(self) -> int | None:
        """The expert index j of an expert unit ("block.i.expert.j"); None otherwise."""
        return expert_index(self.name) if self.kind == "expert" else None

    def tensor(self, name: str) -> TensorMeta:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"unit {self.name} ({self.file}) has no tensor {name!r}")


@dataclass(frozen=True)
class LlamaParams(FamilyParams):
    """Hyper-parameters, named as in Hugging Face's LlamaConfig; other families' in FamilyParams."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # Llama-3 style: {"rope_type": "llama3", "factor": ...}
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelMeta:
    """Everything `metadata.json` says, validated. `root` is the model directory."""

    root: Path
    architecture: str
    params: LlamaParams
    dtype: str
    units: tuple[UnitMeta, ...]
    tokenizer_file: str | None = None
    chat_template: str | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> checksum
    source: str = ""

    def path(self, unit: UnitMeta) -> Path:
        return self.root / unit.file

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @functools.cached_property
    def qtypes(self) -> frozenset[str]:
        """The quantized types ("int4", "int8") some tensor of the model is stored as."""
        return frozenset(t.quant.qtype for u in self.units for t in u.tensors if t.quant is not None)

    @property
    def num_params(self) -> int:
        n = sum(t.numel for u in self.units for t in u.tensors)
        copy = [t.numel for t in self.units[-1].tensors if t.name == "lm_head.weight"]
        return n - (copy[0] if self.params.tie_word_embeddings and copy else 0)  # older directories


def unit_file_name(index: int) -> str:
    return f"layer_{index:03d}.bin"


CHECKSUM = "wsum64"  # what convert / synth write; "sum64" (older models) is still verified
CHECKSUMS = ("wsum64", "sum64")
_BLOCK_WORDS = ALIGN // 8  # 512 64-bit words per 4 KiB block
# blocks weighted per step: a 4 MiB temporary on the CPU (cache-sized: 4x faster there than 32 MiB,
# measured), 64 MiB on a GPU (fewer kernel launches)
_CHUNK_BLOCKS = {"cpu": 1024, "cuda": 16384}


def checksum(buf: torch.Tensor, algo: str = CHECKSUM) -> str:
    """Checksum of a unit's bytes (uint8, host or device memory, a multiple of 8 bytes), in hex.

    "wsum64" (order-sensitive): the bytes as little-endian 64-bit words in 4 KiB blocks of 512;
    word k of block b counts r[k] * t[b] times, all wrapping mod 2**64, where r and t are fixed
    pseudo-random odd 64-bit weights (splitmix64). Any flipped byte changes it, and so does a
    reordering: two swapped blocks change it by (t[a] - t[b]) * (s_a - s_b), s the blocks'
    weighted sums, two swapped words by (r[i] - r[j]) * (w_i - w_j). Torch ops only (one
    multiply and two sums per word), so it runs where the bytes land, at memory speed.
    "sum64" (older models): the plain wrapping sum of the words; blind to any reordering.
    It guards against truncation, corruption and misplaced blocks, not against an adversary.
    """
    assert buf.dtype == torch.uint8 and buf.numel() % 8 == 0, "unit buffers are 4 KiB padded"
    words = buf.view(torch.int64)
    if algo == "sum64":
        total = int(words.sum(dtype=torch.int64).item())
    elif algo == "wsum64":
        total = int(_weighted_sum(words).item())
    else:
        raise FormatError(f"unknown checksum algorithm {algo!r} (this GdsLLM knows {', '.join(CHECKSUMS)})")
    return f"{algo}:{total & 0xFFFFFFFFFFFFFFFF:016x}"


def checksum_algo(value: str) -> str:
    """The algorithm of a stored checksum ("wsum64:...": "wsum64")."""
    return value.partition(":")[0]


def _weighted_sum(words: torch.Tensor) -> torch.Tensor:
    n = words.numel()
    full = n // _BLOCK_WORDS
    r, t = _weights(words.device, full + 1)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    blocks = words[: full * _BLOCK_WORDS].view(full, _BLOCK_WORDS)
    step = _CHUNK_BLOCKS.get(words.device.type, 1024)
    for b0 in range(0, full, step):
        part = blocks[b0: b0 + step]
        total += ((part * r).sum(dim=1, dtype=torch.int64) * t[b0: b0 + part.shape[0]]).sum(dtype=torch.int64)
    if n > full * _BLOCK_WORDS:  # a tail shorter than a block (side files)
        tail = words[full * _BLOCK_WORDS:]
        total += (tail * r[: tail.numel()]).sum(dtype=torch.int64) * t[full]
    return total


def _weights(device: torch.device, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r: one weight per word of a block, t: one per block, at least `blocks` of them)."""
    size = 1 << max(blocks - 1, 1).bit_length()  # cached per power of two: few sizes, reused
    return _weights_cached(str(device), size)


@functools.lru_cache(maxsize=16)
def _weights_cached(device: str, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    def splitmix64(i: np.ndarray) -> np.ndarray:  # uint64 arithmetic wraps, by definition
        z = i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) | np.uint64(1)  # odd: no weight loses a bit

    with np.errstate(over="ignore"):
        r = splitmix64(np.arange(1, _BLOCK_WORDS + 1, dtype=np.uint64))
        t = splitmix64(np.arange(1 << 40, (1 << 40) + blocks, dtype=np.uint64))
    return (torch.from_numpy(r.view(np.int64)).to(device), torch.from_numpy(t.view(np.int64)).to(device))


def _require(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise FormatError(f"{where}: {what}")


def _parse_tensor(d: dict, where: Path, unit_name: str) -> TensorMeta:
    if isinstance(d, dict) and d.get("quant") is not None:
        return _parse_quant_tensor(d, where, unit_name)
    try:
        t = TensorMeta(str(d["name"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]),
                       int(d["offset"]), int(d["nbytes"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: unit {unit_name}: malformed tensor entry {d!r}: {e}") from None
    _require(t.dtype in DTYPES, where, f"unit {unit_name} tensor {t.name}: unsupported dtype {t.dtype!r}")
    _require(t.offset % ALIGN == 0, where, f"unit {unit_name} tensor {t.name}: offset {t.offset} "
             f"is not {ALIGN}-byte aligned")
    _require(t.nbytes == t.numel * ITEMSIZE[t.dtype], where,
             f"unit {unit_name} tensor {t.name}: nbytes {t.nbytes} does not match shape {t.shape} "
             f"of {t.dtype}")
    return t


def _parse_unit(d: dict, index: int, p: LlamaParams, where: Path) -> UnitMeta:
    try:
        u = UnitMeta(index=int(d["index"]), name=str(d["name"]), kind=str(d["kind"]),
                     layer=None if d.get("layer") is None else int(d["layer"]),
                     file=str(d["file"]), nbytes=int(d["nbytes"]), checksum=str(d["checksum"]),
                     tensors=tuple(_parse_tensor(t, where, str(d.get("name"))) for t in d["tensors"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: malformed unit entry #{index}: {e}") from None
    _require(u.index == index, where, f"unit {u.name}: index {u.index}, expected {index}")
    _require(u.kind in UNIT_KINDS, where, f"unit {u.name}: unknown kind {u.kind!r}")
    _require("/" not in u.file and u.file not in ("", ".", ".."), where,
             f"unit {u.name}: bad file name {u.file!r}")
    _require(checksum_algo(u.checksum) in CHECKSUMS, where, f"unit {u.name}: unknown checksum "
             f"{u.checksum!r} (this GdsLLM knows {', '.join(CHECKSUMS)})")
    _require(u.nbytes % ALIGN == 0, where, f"unit {u.name}: file size {u.nbytes} not padded to {ALIGN}")
    names = [t.name for t in u.tensors]
    expected = unit_tensor_shapes(p, u.kind, tied_copy="lm_head.weight" in names)
    _require(sorted(names) == sorted(expected), where,
             f"unit {u.name}: tensors {sorted(names)}, expected {sorted(expected)}")
    spans = sorted((a, b, t.name) for t in u.tensors for a, b in t.spans)
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        _require(a1 <= b0, where, f"unit {u.name}: tensors {an} and {bn} overlap")
    _require(spans[-1][1] <= u.nbytes, where, f"unit {u.name}: tensor {spans[-1][2]} runs past the "
             f"end of {u.file} ({u.nbytes} bytes)")
    for t in u.tensors:
        _require(t.shape == expected[t.name], where,
                 f"unit {u.name} tensor {t.name}: shape {t.shape}, expected {expected[t.name]}")
    return u


def parse_params(cfg: dict, where: Path) -> LlamaParams:
    try:
        eos = cfg.get("eos_token_ids") or ()
        p = LlamaParams(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_key_value_heads=int(cfg["num_key_value_heads"]), head_dim=int(cfg["head_dim"]),
            rms_norm_eps=float(cfg["rms_norm_eps"]), rope_theta=float(cfg["rope_theta"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
            rope_scaling=cfg.get("rope_scaling"),
            bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
            eos_token_ids=tuple(int(e) for e in eos), **family_fields(cfg))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: malformed or missing hyper-parameter: {e}") from None
    _require((problem := family_problem(p)) is None, where, str(problem))
    return p


def load_model_meta(root: str | os.PathLike, check_files: bool = True) -> ModelMeta:
    """Read and validate `root/metadata.json`; with `check_files`, check every file's size.

    Raises FormatError naming the file and the field at fault. Checksums are verified where the
    bytes are read (`verify_unit`), not here: that would read the whole model.
    """
    root = Path(root).expanduser()
    where = root / METADATA_FILE
    try:
        doc = json.loads(where.read_text())
    except FileNotFoundError:
        raise FormatError(f"{where}: not found; is {root} a GdsLLM model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: not valid JSON: {e}") from None
    _require(isinstance(doc, dict), where, "top level is not an object")
    _require(doc.get("format") == FORMAT_NAME, where, f"format {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    _require(doc.get("format_version") in READABLE_VERSIONS, where,
             f"format_version {doc.get('format_version')!r}, this GdsLLM reads {', '.join(map(str, READABLE_VERSIONS))}")
    arch = doc.get("architecture")
    _require(arch in SUPPORTED_ARCHITECTURES, where, f"unsupported architecture {arch!r}")
    _require(isinstance(doc.get("config"), dict), where, "missing 'config' object")
    params = parse_params(doc["config"], where)
    _require(doc.get("dtype") in DTYPES, where, f"unsupported dtype {doc.get('dtype')!r}")
    raw_units = doc.get("units")
    _require(isinstance(raw_units, list), where, "missing 'units' list")
    units = tuple(_parse_unit(u, i, params, where) for i, u in enumerate(raw_units))
    layout = unit_layout(params)
    _require([(u.name, u.kind, u.layer) for u in units] == layout, where,
             f"units {[u.name for u in units]} do not match the layout of "
             f"{params.num_hidden_layers} decoder blocks")
    _require(len({u.file for u in units}) == len(units), where, "two units share a file")
    meta = ModelMeta(root=root, architecture=arch, params=params, dtype=doc["dtype"], units=units,
                     tokenizer_file=doc.get("tokenizer_file"), chat_template=doc.get("chat_template"),
                     extra_files=dict(doc.get("extra_files") or {}), source=str(doc.get("source", "")))
    if check_files:
        for u in units:
            path = meta.path(u)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise FormatError(f"{path}: missing (unit {u.name})") from None
            _require(size == u.nbytes, path, f"size {size} bytes, metadata says {u.nbytes} "
                     f"(unit {u.name}); truncated or wrong file")
        for name in meta.extra_files:
            _require((root / name).is_file(), root / name, "missing (listed in extra_files)")
    return meta


def checksum_warning(meta: ModelMeta) -> str | None:
    """One line telling the user to re-convert a model whose units carry an older checksum."""
    old = sorted({checksum_algo(u.checksum) for u in meta.units} - {CHECKSUM})
    if not old:
        return None
    return (f"{meta.root}: its units carry the {'/'.join(old)} checksum, which misses reordered "
            f"blocks; verified with it, but re-convert the model (gdsllm convert / synth) to get "
            f"{CHECKSUM}")


def verify_unit(meta: ModelMeta, unit: UnitMeta, buf: torch.Tensor) -> None:
    """Raise FormatError if the bytes read for `unit` (uint8, any device) fail its checksum."""
    got = checksum(buf[: unit.nbytes], checksum_algo(unit.checksum))
    if got != unit.checksum:
        raise FormatError(f"{meta.path(unit)}: checksum {got}, metadata says {unit.checksum} "
                          f"(unit {unit.name}); the file is corrupt")


@dataclass(frozen=True)
class QuantMeta:
    """How a quantized tensor is stored (gdsllm.quant.schemes): its qtype, group size and layout,
    and where its companion (scale, zero) tensor lies in the same unit file (4 KiB aligned)."""

    qtype: str
    group_size: int
    layout: str
    scales_offset: int
    scales_nbytes: int

    @classmethod
    def from_json(cls, d: dict) -> "QuantMeta":
        return cls(str(d["qtype"]), int(d["group_size"]), str(d["layout"]),
                   int(d["scales_offset"]), int(d["scales_nbytes"]))

    def to_json(self) -> dict:
        return {"qtype": self.qtype, "group_size": self.group_size, "layout": self.layout,
                "scales_offset": self.scales_offset, "scales_nbytes": self.scales_nbytes}

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(self.scales_offset, self.scales_offset + self.scales_nbytes)]


def _parse_quant_tensor(d: dict, where: Path, unit_name: str) -> TensorMeta:
    """The TensorMeta of a quantized entry of metadata.json, checked (FormatError if not sound)."""
    try:
        t = TensorMeta(str(d["name"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]),
                       int(d["offset"]), int(d["nbytes"]), QuantMeta.from_json(d["quant"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: unit {unit_name}: malformed tensor entry {d!r}: {e}") from None
    return check_quant_tensor(t, where, unit_name)


def check_quant_tensor(t: TensorMeta, where: Path, unit_name: str) -> TensorMeta:
    """`t` if its quantized entry is consistent; FormatError naming the file and tensor if not."""
    q = t.quant
    assert q is not None
    at = f"unit {unit_name} tensor {t.name}"

    def require(cond: bool, what: str) -> None:
        if not cond:
            raise FormatError(f"{where}: {at}: {what}")

    require(q.qtype in quant_layout.QTYPES, f"unsupported qtype {q.qtype!r}; this GdsLLM reads "
            f"{', '.join(quant_layout.QTYPES)} (written by a newer GdsLLM?)")
    require(t.dtype == q.qtype, f"dtype {t.dtype!r} but qtype {q.qtype!r}")
    require(q.layout in quant_layout.LAYOUTS[q.qtype], f"{q.qtype} layout {q.layout!r} is not one this "
            f"GdsLLM reads ({', '.join(quant_layout.LAYOUTS[q.qtype])}); convert the model again")
    try:
        quant_layout.check_shape(q.qtype, t.shape, q.group_size, at)
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None
    require(t.offset % ALIGN == 0 and q.scales_offset % ALIGN == 0,
            f"offsets {t.offset} / {q.scales_offset} are not {ALIGN}-byte aligned")
    require(t.nbytes == quant_layout.data_nbytes(q.qtype, t.shape),
            f"nbytes {t.nbytes} does not match {q.qtype} of shape {t.shape}")
    require(q.scales_nbytes == quant_layout.scales_nbytes(q.qtype, t.shape, q.group_size),
            f"scales_nbytes {q.scales_nbytes} does not match shape {t.shape} in groups of "
            f"{q.group_size}")
    return t
