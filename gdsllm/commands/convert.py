"""`gdsllm convert SRC DST [--dtype float16|bfloat16|float32] [--quant none|int8|int4]
[--group-size 32|64|128] [--device auto|cpu|cuda]`: a Hugging Face directory or a `.gguf` file
(LLaMA, Qwen2/2.5, Qwen3, Mistral, Gemma 3 text) into a GdsLLM model directory, or a GdsLLM
model directory re-quantized.
Without `--quant`, a GGUF's quantized blocks stay quantized (int4 / int8, see gdsllm.convert.gguf)
and a Hugging Face checkpoint stays float; `--quant none` dequantizes. The output appears
atomically (temp dir + rename): an error or Ctrl-C leaves nothing behind. Progress on stderr.
`--device` is where quantization computes (default: cuda when torch sees a GPU); the bytes
written are the same on either (gdsllm.quant.rtn), a GPU is only faster (a 7B model: minutes on
a CPU).
"""
from __future__ import annotations

from pathlib import Path

from gdsllm.commands.options import DTYPE_NAMES


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face directory or a GGUF file")
    p.add_argument("src", help="Hugging Face model directory, or a .gguf file")
    p.add_argument("dst", help="output model directory (must not exist)")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES,
                   help="dtype the weights are stored (and computed) in (default float16)")
    p.add_argument("--quant", default=None, choices=["none", "int8", "int4"],
                   help="quantize the projections (embedding and LM head: int8); default: a GGUF "
                        "keeps its quantized blocks, a Hugging Face checkpoint stays float")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128],
                   help="inputs per (scale, zero) group when quantizing (default 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where --quant computes (default auto: cuda if available); same bytes")
    p.set_defaults(func=run)


def quant_device(device: str | None) -> str:
    """`--device` of convert: "auto" (or None) is cuda when torch sees a GPU; cuda checked."""
    import torch
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return device


def convert(src: str | Path, dst: str | Path, dtype: str = "float16", progress: bool = False,
            quant: str | None = None, group_size: int = 64, device: str | None = "cpu") -> Path:
    """Dispatch on the source: a directory is Hugging Face, a `.gguf` file is GGUF. `device`:
    where quantization computes (see `quant_device`)."""
    src = Path(src).expanduser()
    dev = quant_device(device)
    if Path(dst).expanduser().exists():  # refused before reading the source (minutes for a 7B)
        raise FileExistsError(f"{Path(dst).expanduser()}: already exists (remove it or pick another path)")
    if src.is_dir() and (src / "metadata.json").is_file():  # a GdsLLM model: re-quantize it
        from gdsllm.convert.requantize import requantize
        return requantize(src, dst, quant or "none", group_size, dtype, progress=progress,
                          quant_device=dev)
    if src.is_dir():
        from gdsllm.convert.hf import convert_hf
        return convert_hf(src, dst, dtype=dtype, progress=progress, quant=quant or "none",
                          group_size=group_size, quant_device=dev)
    if src.suffix.lower() == ".gguf" or (src.is_file() and _magic(src) == b"GGUF"):
        from gdsllm.convert.gguf import convert_gguf
        return convert_gguf(src, dst, dtype=dtype, progress=progress, quant=quant,
                            group_size=group_size, quant_device=dev)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    from gdsllm.format.metadata import FormatError
    raise FormatError(f"{src}: neither a Hugging Face model directory nor a .gguf file")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def run(args) -> int:
    from gdsllm.format.metadata import load_model_meta
    dst = convert(args.src, args.dst, args.dtype, progress=True, quant=args.quant,
                  group_size=args.group_size, device=args.device)
    meta = load_model_meta(dst)
    qtypes = sorted({t.dtype for u in meta.units for t in u.tensors if t.quant is not None})
    print(f"{dst}: {meta.num_params / 1e6:.1f}M parameters, {meta.total_bytes / 1e9:.2f} GB in "
          f"{len(meta.units)} units ({meta.dtype}{''.join(', ' + q for q in qtypes)})")
    return 0
