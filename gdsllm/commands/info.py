"""`gdsllm info [-m MODEL]`: what a model is (architecture, parameters, dtype, qtype and bytes per unit) and
which I/O path this machine would take to stream it (gds / compat / posix).
"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model and this machine's I/O path")
    p.add_argument("-m", "--model", default=None, help="model directory (default: embedded model)")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def unit_qtype(unit) -> str:
    """The storage types of a unit's weights, largest first: "int4+float32", "int8", "float16"."""
    by = {}
    for t in unit.tensors:
        by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
    return "+".join(sorted(by, key=by.get, reverse=True))


def _quantized(meta) -> list[str]:
    qs = {}
    for u in meta.units:
        for t in u.tensors:
            if t.quant is not None:
                qs.setdefault(t.quant.qtype, set()).add(t.quant.group_size)
    return [f"{q} (groups of {', '.join(map(str, sorted(g)))})" for q, g in sorted(qs.items())]


def _features(p) -> list[str]:
    """What sets this model's family parameters apart from plain LLaMA, in words."""
    out = []
    if p.attention_bias or p.attention_out_bias or p.mlp_bias:
        out.append("biases: " + "/".join(n for n, on in (("qkv", p.attention_bias), ("o", p.attention_out_bias),
                                                        ("mlp", p.mlp_bias)) if on))
    if p.qk_norm:
        out.append("q/k norms")
    if p.sliding_window is not None and "sliding_attention" in p.layer_types:
        n = p.layer_types.count("sliding_attention")
        out.append(f"sliding window {p.sliding_window} on {n}/{p.num_hidden_layers} layers")
    if p.rope_local_theta is not None:
        out.append(f"local rope theta {p.rope_local_theta:g}")
    if p.hidden_act != "silu":
        out.append(p.hidden_act)
    if p.final_logit_softcapping is not None:
        out.append(f"logit soft-cap {p.final_logit_softcapping:g}")
    if p.num_experts:
        out.append(f"{p.num_experts} experts of ffn {p.moe_intermediate_size}, top-{p.num_experts_per_tok}"
                   + (" renormalised" if p.norm_topk_prob else ""))
    return out


def describe(root) -> str:
    """The report `gdsllm info` prints, for the model directory `root`."""
    import torch

    from gdsllm.format.metadata import load_model_meta
    from gdsllm.format.storage import probe_io_path
    meta = load_model_meta(root)
    p = meta.params
    lines = [
        f"model         {meta.root}",
        f"source        {meta.source or '-'}",
        f"family        {meta.architecture}" + (f" ({', '.join(_features(p))})" if _features(p) else ""),
        f"architecture  {meta.architecture} ({p.num_hidden_layers} layers, hidden {p.hidden_size}, "
        f"heads {p.num_attention_heads}/{p.num_key_value_heads} kv, head_dim {p.head_dim}, "
        f"ffn {p.intermediate_size}, vocab {p.vocab_size}, "
        f"{'tied' if p.tie_word_embeddings else 'untied'} embeddings)",
        f"rope          theta {p.rope_theta:g}" + (f", scaling {p.rope_scaling}" if p.rope_scaling else ""),
        f"parameters    {meta.num_params:,} ({meta.num_params / 1e6:.1f}M)",
        f"dtype         {meta.dtype}" + (f"; quantized: {', '.join(_quantized(meta))}"
                                            if _quantized(meta) else ""),
        f"total bytes   {meta.total_bytes:,} ({_size(meta.total_bytes)}) in {len(meta.units)} units",
        f"tokenizer     {meta.tokenizer_file or '-'}; chat template {'yes' if meta.chat_template else 'no'}",
        "io path       cpu: " + probe_io_path("cpu") +
        (f", cuda: {probe_io_path('cuda')}" if torch.cuda.is_available() else ", cuda: no GPU"),
        "",
        f"{'unit':<10} {'file':<15} {'bytes':>14} {'tensors':>8}  qtype",
    ]
    for u in meta.units:
        lines.append(f"{u.name:<10} {u.file:<15} {u.nbytes:>14,} {len(u.tensors):>8}  {unit_qtype(u)}")
    return "\n".join(lines)


def run(args) -> int:
    from gdsllm.convert.default_model import resolve_model
    print(describe(resolve_model(args.model)))
    return 0
