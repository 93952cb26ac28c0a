"""The compute worker's side of a mixture of experts (gdsllm.service.compute_worker calls these):
after a MoE block unit runs, `Routed` names the experts its router picked for the pass and the
guess for the next layer; `RunExperts` runs expert units that the coordinator put in arena slots.

    routed = after_block(worker, unit, weights)   # -> Routed, sent after the block's Done
    send_routed(worker, run, routed)              # Routed; the routed experts the Run lent run
    run_experts(worker, msg)                      # RunExperts -> ExpertsDone

The guess (speculative prefetch, after mixtral-offloading): layer i+1's router applied to layer
i's residual stream after attention, normed with layer i+1's post-attention norm. Both weights
are small (experts x hidden, hidden) and are copied once, the first time layer i+1's block unit
runs (`RouterBank`), so the guess needs no unit resident. A wrong guess costs bandwidth only: the
coordinator loads what the real router picks either way.
"""
from __future__ import annotations

import time

import torch

from ipc.messages import ExpertsDone, Routed, RunExperts, WorkerError

from gdsllm.models.layers import linear, rms_norm
from gdsllm.models.moe import router_topk
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


class ExpertState:
    """The compute worker's side of a mixture of experts: the routers for the next-layer guess,
    and the tensor views of each expert slot (`views`: arena offset -> (expert unit, tensors))."""

    def __init__(self, params):
        self.bank = RouterBank(params)
        self.views: dict[int, tuple] = {}


def _state(worker) -> ExpertState:
    if worker.moe is None:
        worker.moe = ExpertState(worker.meta.params)
    return worker.moe


def after_block(worker, unit, weights: dict) -> Routed:
    """The Routed message of MoE block `unit` just run (its weights still valid)."""
    bank = _state(worker).bank
    bank.remember(unit.layer, weights)
    routing = worker.runner.pending_routing
    predicted = bank.guess(unit.layer + 1, routing.residual)
    return Routed(worker.pass_id, unit.index, routing.experts(), predicted)


def send_routed(worker, run, routed: Routed) -> None:
    """Send `routed`, then run the experts it picked that the block's Run lent (resident: cache
    hits), so the coordinator reads the misses meanwhile; one ExpertsDone for those."""
    worker.send(routed)
    n, picked = len(worker.meta.units), set(routed.experts)
    hits = [(u, off) for u, off in run.experts  # a malformed entry runs, and fails the pass
            if not (0 <= u < n and worker.meta.units[u].kind == "expert")
            or worker.meta.units[u].expert in picked]
    if hits:
        _run(worker, routed.pass_id, routed.unit, hits)


def run_experts(worker, msg: RunExperts) -> None:
    """Run the expert units of `msg` (ExpertsDone either way: the slots must come back)."""
    _run(worker, msg.pass_id, msg.unit, msg.experts)


def _views(worker, unit, offset: int) -> dict:
    """The tensors of expert `unit` in the slot at `offset`: views made once per slot and expert
    (a slot's views stay valid while it holds that expert; building them per run cost ~40 us)."""
    views = _state(worker).views
    got = views.get(offset)
    if got is None or got[0] != unit.index:
        from gdsllm.models.views import unit_tensors
        got = views[offset] = (unit.index, unit_tensors(unit, worker.arena.view(offset, unit.nbytes)))
    return got[1]


def _run(worker, pass_id: int, block: int, experts: list[tuple[int, int]]) -> None:
    t0 = time.perf_counter()
    ran = [u for u, _ in experts]
    if worker.pass_id is None or worker.pass_failed or pass_id != worker.pass_id:
        if worker.pass_id is None or pass_id != worker.pass_id:
            worker.send(WorkerError(f"RunExperts of pass {pass_id} outside it", unit=block))
        worker.send(ExpertsDone(pass_id, block, ran, 0.0))
        return
    try:
        n = len(worker.meta.units)
        for u, offset in experts:
            if not 0 <= u < n or worker.meta.units[u].kind != "expert":
                raise ValueError(f"unit {u} is not an expert unit of the model")
            unit = worker.meta.units[u]
            worker.runner.run_expert(unit, _views(worker, unit, offset))
        worker.runner.fence()  # the slots may be refilled once ExpertsDone is out
    except Exception as e:
        worker.runner.abort_pass()
        worker.pass_failed = True
        worker.send(WorkerError(f"pass {pass_id}, experts of unit {block}: "
                                 f"{type(e).__name__}: {e}", pass_id=pass_id, unit=block))
    seconds = time.perf_counter() - t0
    worker.pass_seconds += seconds
    worker.send(ExpertsDone(pass_id, block, ran, seconds))
