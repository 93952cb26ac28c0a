"""Synthetic mixtures of experts (`gdsllm synth --shape tiny-moe|mixtral-8x7b|qwen3-30b-a3b`),
the models the MoE benchmark runs: int4 experts drawn as codes, each its own unit, routing spread
over the experts at every depth as a trained model's is.
"""
from __future__ import annotations

import pytest

from llama_ref import load
from gdsllm import LLM, SamplingParams


def test_synth_moe_shape_int4(tmp_path):
    """`synth --shape tiny-moe --quant int4`: int4 experts drawn as codes, each its own unit; it
    runs, reads only routed experts, and `gdsllm info` names the experts."""
    from gdsllm.commands.info import describe
    from gdsllm.convert.synth import synth, synth_params
    d = synth(tmp_path / "m", "tiny-moe", dtype="float32", quant="int4", group_size=32)
    meta = load(d)
    assert meta.architecture == "mixtral" and meta.params == synth_params("tiny-moe")
    assert {t.dtype for u in meta.units if u.kind == "expert" for t in u.tensors} == {"int4"}
    with LLM(str(d)) as llm:
        out = llm.generate([1, 5, 9, 30], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        st = llm.experts.stats()
    assert len(out.token_ids) == 4 and 0 < st["expert_loads"] <= meta.params.num_hidden_layers * 8
    assert "8 experts of ffn 128, top-2 renormalised" in describe(d)
    with pytest.raises(ValueError, match="hf-out"):
        synth(tmp_path / "x", "tiny-moe", hf_out=tmp_path / "x-hf")


def test_synth_moe_routing_spreads(tmp_path, monkeypatch):
    """A synthetic MoE routes like a trained one, over nearly all experts at every depth (with
    plain std-0.02 weights the residual stream lost each token's identity and every layer past
    the first few routed to a handful of experts), and its int4 codes are centred on zero."""
    import torch
    from gdsllm.convert.synth import _tensor, synth
    from gdsllm.engine.experts import ExpertCache
    w = _tensor(0, 3, 0, "up_proj.weight", (256, 512), torch.float32, "int4", 32).dequantize()
    assert abs(w.mean().item()) < 0.05 * w.std().item()
    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 moe_intermediate_size=32, vocab_size=4096, num_experts=32, num_experts_per_tok=4)
    d = synth(tmp_path / "m", "qwen3-30b-a3b", layers=12, dtype="float32", quant="int4",
              group_size=32, overrides=shape)
    seen: dict[int, set[int]] = {}
    run_layer = ExpertCache.run_layer

    def spy(self, runner, layer):
        seen.setdefault(layer, set()).update(runner.pending_routing.experts())
        return run_layer(self, runner, layer)

    monkeypatch.setattr(ExpertCache, "run_layer", spy)
    with LLM(str(d)) as llm:
        llm.logits(list(range(100, 140)))  # 40 distinct tokens
    assert len(seen) == 12
    assert min(len(es) for es in seen.values()) >= 24, {k: len(v) for k, v in seen.items()}
