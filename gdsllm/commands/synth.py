"""`gdsllm synth DST --shape {tiny,smollm2-135m,llama-7b,llama-13b,tiny-moe,mixtral-8x7b,
qwen3-30b-a3b} [--layers N] [--seed S] [--dtype float16] [--quant int4] [--hf-out DIR]`: a random
model of that shape, written unit by unit (a 13.8 GB LLaMA-7B needs one unit of RAM), optionally
with the same weights as a Hugging Face directory (LLaMA float shapes). Mixture-of-experts shapes
write each expert as its own unit; `--quant int4` draws the projections as int4 codes directly
(Mixtral 8x7B: about 25 GB).
"""
from __future__ import annotations

from gdsllm.commands.options import DTYPE_NAMES, LazyChoices


def _shapes():
    from gdsllm.convert.synth import SHAPES
    return SHAPES


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a random LLaMA-shaped model (benchmarks, tests)")
    p.add_argument("dst", help="output model directory (must not exist)")
    p.add_argument("--shape", default="tiny", choices=LazyChoices(_shapes), metavar="SHAPE",
                   help="the LLaMA shape to imitate: %(choices)s (default tiny)")
    p.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--dtype", default="float16", choices=DTYPE_NAMES,
                   help="dtype of the stored weights (default float16)")
    p.add_argument("--quant", default="none", choices=("none", "int8", "int4"),
                   help="store the projections quantized, drawn as random codes (default none)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--hf-out", default=None, metavar="DIR",
                   help="also write the same weights as a Hugging Face directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from gdsllm.format.metadata import load_model_meta
    from gdsllm.convert.synth import synth
    dst = synth(args.dst, args.shape, layers=args.layers, seed=args.seed, dtype=args.dtype,
                hf_out=args.hf_out, progress=True, quant=args.quant, group_size=args.group_size)
    meta = load_model_meta(dst)
    print(f"{dst}: {meta.num_params / 1e6:.1f}M parameters, {meta.total_bytes / 1e9:.2f} GB "
          f"in {len(meta.units)} units ({args.dtype})" + (f"; Hugging Face copy in {args.hf_out}"
                                                           if args.hf_out else ""))
    return 0
