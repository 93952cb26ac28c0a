"""Model families: the block math of each architecture, one module per family.

A family module exposes `decoder_block(p, weights, x, cos, sin, batch, layer, cudnn_attention)`
and `lm_head(p, weights, x)`; the pieces families share (rotary embeddings, RMSNorm, the embedding,
attention over the KV cache, `linear`) live in `gdsllm.models.layers`. The runner picks the module
by the architecture recorded in `metadata.json`:

    fam = family(meta.architecture)        # gdsllm.models.llama
    x = fam.decoder_block(meta.params, weights, x, cos, sin, batch, layer)

A new family is a new module here plus one entry in FAMILIES (and in
`gdsllm.format.metadata.SUPPORTED_ARCHITECTURES`, which the format checks without importing torch
code). A mixture-of-experts family (`num_experts` > 0) exposes `route` instead of a whole block:
the experts are units of their own (gdsllm.models.moe). A family that is LLaMA with a switch re-exports llama's block; the switch is a parameter.
"""
from __future__ import annotations

from types import ModuleType

from gdsllm.models import gemma3, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe

FAMILIES: dict[str, ModuleType] = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3,
                                   "mistral": mistral, "gemma3": gemma3, "mixtral": mixtral,
                                   "qwen3_moe": qwen3_moe}


def family(architecture: str) -> ModuleType:
    """The module holding `architecture`'s block math; ValueError naming the supported ones."""
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}") from None
