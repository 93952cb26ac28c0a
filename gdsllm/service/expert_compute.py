"""The compute worker's side of a mixture of experts: one `ExpertCompute`, owned by the
gdsllm.service.compute_worker.ComputeWorker, made with its Runner once the arena is open.

    experts = ExpertCompute(meta, runner, arena.view)
    routed = experts.after_block(pass_id, unit, weights)   # -> Routed, sent after the block's Done
    hits = experts.lent_hits(run.experts, routed)          # the routed experts the block's Run lent
    experts.run(pairs)                                     # [(expert unit, arena offset)]; raises

After a MoE block unit runs, `Routed` names the experts its router picked for the pass and the
guess for the next layer; `run` runs expert units from their arena slots (the ones the coordinator
put there with RunExperts, or the resident ones a block's Run lent) and fences, so the slots may
be refilled once it returns.

Why a class of its own, and why it holds no pass state: the MoE compute (the router copies for
the guess, the slots' tensor views, running expert units) is one responsibility, with state of
its own that nothing else reads. The pass protocol is another: which pass is running, whether it
failed, its seconds, and the replies (ExpertsDone, WorkerError) are the worker's, so the worker
calls these methods, decides what a failure means for the pass and sends every message. No
socket here, and no field of the worker is read or written.

The guess (speculative prefetch, after mixtral-offloading): layer i+1's router applied to layer
i's residual stream after attention, normed with layer i+1's post-attention norm. Both weights
are small (experts x hidden, hidden) and are copied once, the first time layer i+1's block unit
runs (`RouterBank`), so the guess needs no unit resident. A wrong guess costs bandwidth only: the
coordinator loads what the real router picks either way.
"""
from __future__ import annotations

import torch

from ipc.messages import Routed

from gdsllm.models.layers import linear, rms_norm
from gdsllm.models.moe import router_topk
from gdsllm.models.views import unit_tensors
from gdsllm.quant.schemes import QuantWeight


class RouterBank:
    """Copies of each MoE layer's router and post-attention norm, for the next-layer guess."""

    def __init__(self, params):
        self.p = params
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def remember(self, layer: int, weights: dict) -> None:
        if layer not in self.layers:
            norm, gate = weights["post_attention_layernorm.weight"], weights["mlp.gate.weight"]
            if isinstance(gate, QuantWeight):  # a GGUF's quantized router: a float copy
                gate = gate.dequantize(norm.dtype)
            self.layers[layer] = (norm.clone(), gate.clone())

    def guess(self, layer: int, residual: torch.Tensor) -> list[int]:
        """The experts layer `layer`'s router would pick from `residual` (after attention of
        the layer before); [] when that layer has not been seen yet or does not exist."""
        got = self.layers.get(layer)
        if got is None:
            return []
        norm, gate = got
        h = rms_norm(residual, norm, self.p.rms_norm_eps)
        idx, _ = router_topk(self.p, linear({"g": gate}, "g", h))
        return sorted(int(e) for e in torch.unique(idx).tolist())


class ExpertCompute:
    """Runs a MoE model's expert units for the compute worker (see the module docstring).
    `view(offset, nbytes)` is the arena's: the bytes of a slot as a tensor."""

    def __init__(self, meta, runner, view):
        self.meta, self.runner, self.view = meta, runner, view
        self.bank = RouterBank(meta.params)
        self.views: dict[int, tuple] = {}  # arena offset -> (expert unit, its tensors)

    def after_block(self, pass_id: int, unit, weights: dict) -> Routed:
        """The Routed message of MoE block `unit` just run (its weights still valid)."""
        self.bank.remember(unit.layer, weights)
        routing = self.runner.pending_routing
        predicted = self.bank.guess(unit.layer + 1, routing.residual)
        return Routed(pass_id, unit.index, routing.experts(), predicted)

    def lent_hits(self, lent: list[tuple[int, int]], routed: Routed) -> list[tuple[int, int]]:
        """The experts of `lent` (a block's Run: resident, (unit, offset)) that `routed` picked:
        cache hits, to run at once. A malformed entry is kept: it runs, and fails the pass."""
        picked = set(routed.experts)
        return [(u, off) for u, off in lent if not self._is_expert(u) or self.meta.units[u].expert in picked]

    def run(self, experts: list[tuple[int, int]]) -> None:
        """Run expert units [(unit, arena offset)] into the pending routing, then fence (the slots
        may be refilled once this returns). Raises on an index that is not an expert unit, or
        whatever the compute raised; the caller then aborts the pass."""
        for u, offset in experts:
            if not self._is_expert(u):
                raise ValueError(f"unit {u} is not an expert unit of the model")
            unit = self.meta.units[u]
            self.runner.run_expert(unit, self._views(unit, offset))
        self.runner.fence()

    def _is_expert(self, u: int) -> bool:
        return 0 <= u < len(self.meta.units) and self.meta.units[u].kind == "expert"

    def _views(self, unit, offset: int) -> dict:
        """The tensors of expert `unit` in the slot at `offset`: views made once per slot and
        expert (a slot's views stay valid while it holds that expert; building them per run
        cost ~40 us)."""
        got = self.views.get(offset)
        if got is None or got[0] != unit.index:
            got = self.views[offset] = (unit.index, unit_tensors(unit, self.view(offset, unit.nbytes)))
        return got[1]
