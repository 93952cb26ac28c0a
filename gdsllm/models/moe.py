"""The mixture-of-experts block, in two halves that run with different units resident: the block
unit (attention, norms, router) routes every token, then each routed expert's unit runs its gated
MLP over the rows routed to it, weighted by the router. Numerics as transformers'
`MixtralSparseMoeBlock` / `Qwen3MoeSparseMoeBlock`: softmax over all experts in float32, top-k,
renormalised to sum to 1 where `p.norm_topk_prob` (Mixtral always).

    r = route(p, weights, x, cos, sin, batch, layer)     # Routing: residual, h, top-k
    for e in r.experts():                                     # the union over the batch, sorted
        r.add(e, expert_mlp(p, expert_weights[e], r.rows_of(e)))
    x = r.output()
"""
from __future__ import annotations

import torch

from gdsllm.format.metadata import LlamaParams
from gdsllm.models.attention import PassBatch
from gdsllm.models.layers import act_mul, add_rms_norm, linear, rms_norm, self_attention


class Routing:
    """One MoE block in flight: the residual stream after attention, the normed rows the experts
    take, each row's top-k experts and weights, and the sum of the expert outputs so far."""

    def __init__(self, residual: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                 act: str = "silu", num_experts: int = 0):
        self.residual, self.h, self.idx, self.w = residual, h, idx, w  # idx, w: [T, k]
        self.act = act  # the experts' activation, a name of layers.ACTIVATIONS
        self.acc = torch.zeros_like(h)
        self.done: set[int] = set()
        # One host sync per block: the (row, k) positions routed to each expert, grouped by a
        # stable sort (rows ascending within an expert, as torch.where would give them).
        flat = idx.reshape(-1)
        self._order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        self._span, start = {}, 0
        for e, c in enumerate(counts):
            if c:
                self._span[e] = (start, start + c)
            start += c
        self._union = sorted(self._span)

    def experts(self) -> list[int]:
        """The experts routed for any row of the pass, ascending."""
        return list(self._union)

    def rows_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row indices, their normed states, their router weights) for `expert`."""
        a, b = self._span[expert]
        pos = self._order[a:b]
        k = self.idx.shape[1]
        rows, slot = pos // k, pos % k
        return rows, self.h.index_select(0, rows), self.w[rows, slot]

    def add(self, expert: int, weights: dict[str, torch.Tensor]) -> None:
        """Run `expert`'s MLP (its unit's weights) over its rows and add them, router-weighted."""
        if expert in self.done or expert not in self._union:
            raise RuntimeError(f"expert {expert} run twice or not routed (routed: {self._union})")
        rows, h, w = self.rows_of(expert)
        y = expert_mlp(weights, h, self.act)
        self.acc.index_add_(0, rows, (y * w[:, None]).to(self.acc.dtype))
        self.done.add(expert)

    def output(self) -> torch.Tensor:
        missing = sorted(set(self._union) - self.done)
        if missing:
            raise RuntimeError(f"MoE block finished without its routed experts {missing}")
        return self.residual + self.acc


def router_topk(p: LlamaParams, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [T, k], float32 weights [T, k]) from router logits [T, E], as transformers'
    routers; the weighted sum is taken in float32 and cast back (Mixtral's order)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, p.num_experts_per_tok, dim=-1)
    if p.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return idx, top


def route(p: LlamaParams, weights: dict[str, torch.Tensor], x: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor, batch: PassBatch, layer: int, cudnn_attention: bool = False
          ) -> Routing:
    """The block unit's half: pre-norm attention (appends to each KV cache), the post-attention
    norm and the router. The experts run next (`Routing.add`)."""
    h = rms_norm(x, weights["input_layernorm.weight"], p.rms_norm_eps)
    a = self_attention(p, weights, h, cos, sin, batch, layer, cudnn_attention)
    x, h = add_rms_norm(x, a, weights["post_attention_layernorm.weight"], p.rms_norm_eps)
    idx, w = router_topk(p, linear(weights, "mlp.gate.weight", h))
    return Routing(x, h, idx, w, p.hidden_act, p.num_experts)


def expert_mlp(weights: dict[str, torch.Tensor], h: torch.Tensor, act: str = "silu"
               ) -> torch.Tensor:
    """One expert: down(act(gate(h)) * up(h)) over its rows h [n, hidden]."""
    gate, up = linear(weights, "gate_proj.weight", h), linear(weights, "up_proj.weight", h)
    return linear(weights, "down_proj.weight", act_mul(act, gate, up))


def decoder_block(p: LlamaParams, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, batch: PassBatch, layer: int,
                  cudnn_attention: bool = False, experts: dict[int, dict] | None = None
                  ) -> torch.Tensor:
    """The whole block at once, for callers that hold every expert (`experts[j]`: unit weights)."""
    if experts is None:
        raise RuntimeError(f"block {layer} is a mixture of experts: run `route`, then its experts")
    r = route(p, weights, x, cos, sin, batch, layer, cudnn_attention)
    for e in r.experts():
        r.add(e, experts[e])
    return r.output()
