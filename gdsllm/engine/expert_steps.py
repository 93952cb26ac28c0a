"""The runner's mixture-of-experts steps (gdsllm.engine.runner.Runner inherits them): after a MoE
block unit has run (attention + router, gdsllm.models.moe.route), its routed experts run one by
one over their rows; the next `run_unit` closes the block.

    runner.run_unit(block_unit, weights)
    for e in runner.routed_experts():                 # the union over the pass's tokens
        runner.run_expert(expert_unit(e), expert_weights(e))
    runner.pending_routing                            # the Routing in flight (the next-layer guess)
"""
from __future__ import annotations

import torch

from gdsllm.format.metadata import UnitMeta


class ExpertSteps:
    """Mixed into Runner: reads `self._pass.moe` (a Routing, or None) and `self.layout`."""

    def routed_experts(self) -> list[int]:
        """The experts the MoE block just run routed any token of the pass to (ascending); each
        must go through `run_expert` before the next unit runs."""
        if self._pass is None or self._pass.moe is None:
            raise RuntimeError("routed_experts: no mixture-of-experts block is waiting for its experts")
        return self._pass.moe.experts()

    @property
    def pending_routing(self):
        """The gdsllm.models.moe.Routing of the MoE block waiting for its experts, or None."""
        return None if self._pass is None else self._pass.moe

    def run_expert(self, unit: UnitMeta, weights: dict[str, torch.Tensor]) -> None:
        """Run expert unit `unit` ("block.i.expert.j") of the waiting MoE block over its rows."""
        ps = self._pass
        if ps is None or ps.moe is None or unit.kind != "expert" or \
                self.layout[ps.next_unit - 1][2] != unit.layer:
            raise RuntimeError(f"run_expert({unit.name}): its block is not waiting for experts")
        ps.moe.add(unit.expert, weights)
