"""Tiny random mixtures of experts from transformers (Mixtral, Qwen3-MoE), saved, converted, and
the expert choices transformers' routers make, to check what GdsLLM reads.

    hf, hf_dir, d = moe_model(tmp, "mixtral")
    picks = router_picks(hf, ids)          # [layer][position] -> set of experts (top-k)
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralConfig, Qwen3MoeConfig

from families_ref import save_hf
from gdsllm.convert.hf import convert_hf

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             num_experts_per_tok=2)

# case -> (config class, overrides, GdsLLM architecture)
MOE_CASES = {
    "mixtral": (MixtralConfig, dict(num_local_experts=8, rope_theta=1e6), "mixtral"),
    "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=8, moe_intermediate_size=64, norm_topk_prob=False),
                  "qwen3_moe"),
    "qwen3_moe_norm": (Qwen3MoeConfig, dict(num_experts=6, num_experts_per_tok=3,
                                            moe_intermediate_size=32, norm_topk_prob=True,
                                            attention_bias=True), "qwen3_moe"),
}


def moe_config(case: str, **extra):
    cls, over, _ = MOE_CASES[case]
    return cls(**{**_BASE, **over, **extra})


def moe_model(tmp: Path, case: str, dtype: str = "float32", quant: str = "none", seed: int = 0):
    """(transformers model float32, HF directory, converted GdsLLM directory)."""
    hf_dir = tmp / f"{case}-hf"
    hf = save_hf(moe_config(case), hf_dir, seed)
    d = convert_hf(hf_dir, tmp / f"{case}-{dtype}-{quant}", dtype=dtype, quant=quant)
    return hf, hf_dir, d


@torch.no_grad()
def router_picks(hf, ids: list[int]) -> list[list[set[int]]]:
    """transformers' top-k experts of every layer for every position of one forward over `ids`."""
    out = hf(torch.tensor([ids]), output_router_logits=True)
    k = hf.config.num_experts_per_tok
    return [[set(row.topk(k).indices.tolist()) for row in logits.reshape(len(ids), -1).float()]
            for logits in out.router_logits]


def pass_unions(picks: list[list[set[int]]], passes: list[list[int]]) -> list[list[set[int]]]:
    """[pass][layer] -> the experts any position of that pass (a list of positions) was routed to."""
    return [[set().union(*(layer[i] for i in pos)) for layer in picks] for pos in passes]


def simulate_cache(unions: list[list[set[int]]], slots: int) -> tuple[int, int]:
    """(loads, hits) of an expert cache of `slots` slots over the passes' per-layer unions, hits
    run first in each layer (gdsllm.engine.experts' order); a miss with no free slot evicts, from
    the cached experts, the one whose layer ran most recently counting back from the current
    one (its next turn is farthest), the least recently used of that layer on a tie."""
    last: dict[tuple[int, int], int] = {}  # cached expert -> when it was last used
    loads = hits = clock = 0
    for layers in unions:
        n = len(layers)
        for layer, experts in enumerate(layers):
            for e in sorted(experts, key=lambda e: (layer, e) not in last):
                clock += 1
                if (layer, e) in last:
                    hits += 1
                elif len(last) == slots:
                    del last[min(last, key=lambda c: ((layer - c[0]) % n, last[c]))]
                    loads += 1
                else:
                    loads += 1
                last[(layer, e)] = clock
    return loads, hits


def dequantized_hf(meta, hf_dir: Path, dst: Path):
    """transformers' model of the weights GdsLLM stored (quantized ones dequantized): the exact
    reference for a quantized model. A copy of `hf_dir` with its safetensors rewritten."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from gdsllm.convert.families import hf_tensor_key
    from gdsllm.models.views import unit_tensors
    from gdsllm.format.storage import HostReader, aligned_host_buffer
    from gdsllm.quant.schemes import QuantWeight

    shutil.copytree(hf_dir, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    out = {}
    with HostReader() as r:
        for u in meta.units:
            buf = aligned_host_buffer(u.nbytes)
            r.read(meta.path(u), buf, u.nbytes)
            for name, w in unit_tensors(u, buf).items():
                w = w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()
                out[hf_tensor_key(meta.architecture, u.kind, u.layer, u.expert, name)] = w.clone()
    save_file(out, str(dst / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
