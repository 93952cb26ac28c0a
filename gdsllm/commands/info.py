"""`gdsllm info [-m MODEL] [--vram-budget X]`: what a model is (architecture, parameters, dtype, qtype and
bytes per unit), which I/O path this machine would take to stream it (gds / compat / posix), and the
VRAM ledger's plan before anything loads: what stays resident, the streaming and expert slots, the
draft, and the KV cache the memory free now would give (gdsllm.engine.budget, as LLM and serve plan).
"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model and this machine's I/O path")
    p.add_argument("-m", "--model", default=None, help="model directory (default: embedded model)")
    p.add_argument("--vram-budget", default=None, metavar="SIZE",
                   help="plan for this budget of device memory for weights, e.g. 8GiB (default: as serve)")
    p.add_argument("--prefetch-window", type=int, default=None, metavar="W",
                   help="streaming slots to plan for (default: as serve, 2)")
    p.add_argument("--draft", default=None, metavar="MODEL", help="plan with this draft model resident")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="the device to plan for (default: cuda if usable, else cpu)")
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


def memory_plan(root, device: str, vram_budget: str | None, window: int | None, draft) -> list[str]:
    """The VRAM ledger's plan for `root` on `device` (nothing is loaded), in words."""
    from gdsllm.engine.budget import (DEFAULT_WINDOW, free_device_bytes, kv_tokens, parse_size, plan_memory,
                                      weights_budget)
    from gdsllm.engine.speculative import load_draft_meta
    from gdsllm.format.metadata import ITEMSIZE, load_model_meta
    from gdsllm.models.kv_cache import kv_bytes_per_token
    meta = load_model_meta(root)
    try:
        asked = parse_size(vram_budget) if vram_budget else None
    except ValueError as e:
        raise ValueError(f"--vram-budget: {e}") from None
    dmeta = load_draft_meta(meta, draft) if draft else None
    free = free_device_bytes(device)
    budget = weights_budget(asked, meta.total_bytes + (dmeta.total_bytes if dmeta else 0), free)
    plan = plan_memory(meta, budget=budget, window=window or DEFAULT_WINDOW, draft=dmeta)
    itemsize = 4 if device == "cpu" else ITEMSIZE[meta.dtype]
    per_token = kv_bytes_per_token(meta.params, itemsize)
    left = None if free is None else max(free - plan.device_bytes, 0)
    kv = kv_tokens(meta.params, itemsize, device=device, free_bytes=left)
    lines = [f"plan on       {device}" + ("" if free is None else f" ({_size(free)} free now)")]
    lines += plan.describe(meta, kv, per_token)
    return lines


def run(args) -> int:
    from gdsllm.convert.default_model import resolve_model
    root = resolve_model(args.model)
    print(describe(root))
    from gdsllm.commands.serve import pick_device
    device = pick_device(args.device, service=False)
    print()
    print("\n".join(memory_plan(root, device, args.vram_budget, args.prefetch_window, args.draft)))
    return 0
