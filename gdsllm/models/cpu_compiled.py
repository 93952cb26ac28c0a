"""A decoder block compiled as ONE call for decode on the CPU (torch.compile, Inductor's C++
backend): the same ops as gdsllm.models.layers in the same order, without dispatching them one
by one from Python.

    blocks = CompiledBlocks()                  # one per Runner (CPU); compiles on first use
    y = blocks.decoder_block(p, weights, x, cos, sin, batch, layer)   # None: not covered, run eager

Covered: a decode pass of one sequence (one new token whose keys are consecutive slots of the
pool, `Segment.first`), a LLaMA-shaped block (no biases, no q/k norm, no sliding window, SiLU,
no norm offset) whose q/k/v and gate/up are the CPU's `FusedInt4` and o/down its `PackedInt4`
(gdsllm.engine.host_copies: the default model, resident). Everything else returns None and the
caller runs its eager code: prompts, batches of several sequences, streamed units, other
families and qtypes. The block's inputs are plain tensors and two ints (the sequence's first
slot and its key count, dynamic: no recompile as it grows); the new key/value is written into
the layer's pool inside the call (an in-place index_copy_ on a view of it), attention is SDPA
over views of the pool, as the eager path reads them.

It is compiled once per process at start-up (`warm_up`, over zeros of the block's shapes, when
the Runner pins its first block unit), so no decode pass waits for the compiler. If compiling or
running the compiled call fails (no C++ compiler, an op Inductor does not take), the error is
logged once and every later block runs eager: never a crash.

Off by default, switched on by `--cpu-compile` (serve / run / generate, `ServiceConfig.cpu_compile`)
or `LLM(cpu_compile=True)`; GDSLLM_CPU_COMPILE=0 in the environment switches it off whatever
they say. Why off: the compile costs more than a short generation saves. Measured 2026-12-04
19:10-19:16 UTC on the 2-vCPU AMD EPYC (torch 2.13, 2 threads, load average 0.7-1.2), the
default model: the compile at start-up 8.9-10.2 s with Inductor's on-disk caches cold, 5.2-6.5 s
warm (of which 2.8 s importing torch._dynamo / torch._inductor, 1.5 s tracing, 1.7 s loading the
cached kernels); `gdsllm generate -n 16` 10.4 s wall against 4.6 s eager. A decode token saves
about 3 ms (see docs/BENCHMARKS.md, issue 25), so the warm compile pays back after about 2,000
tokens: a server or a long generation, not `generate -n 32`.

Numerics: NOT always the eager block's bits. On a small random int4 model (hidden 128) every
decode pass's logits are equal (torch.equal, tests/test_cpu_compiled.py); on the default model
(hidden 576) Inductor's own reductions round differently: 64 greedy tokens after "The capital of
France is" are identical, after the benchmark's chat prompt they part at the 33rd token (a near
tie; 2026-12-04 19:30 UTC). That is one more reason it is opt-in.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import LlamaParams
from gdsllm.models.attention import PassBatch, Segment, attention
from gdsllm.models.kv_cache import PagedKVCache
from gdsllm.models.layers import FUSED, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq
from gdsllm.quant.kernels_cpu import INT4_KERNEL, FusedInt4, PackedInt4, fusable, int4_mm
from gdsllm.quant.schemes import QuantWeight

log = logging.getLogger(__name__)

QKV, GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"
O, DOWN = "self_attn.o_proj.weight", "mlp.down_proj.weight"
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def enabled_by_env() -> bool:
    """False where GDSLLM_CPU_COMPILE is set to 0 / false / no / off."""
    return os.environ.get("GDSLLM_CPU_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def covers_params(p: LlamaParams) -> bool:
    """Whether these parameters make the plain LLaMA block the compiled one computes."""
    return (not (p.attention_bias or p.attention_out_bias or p.mlp_bias or p.qk_norm)
            and not p.num_experts and p.hidden_act == "silu" and not p.norm_weight_offset
            and p.sliding_window is None and not p.layer_types
            and p.query_pre_attn_scalar is None and not p.feedforward_norms)


def _make_block(eps: float, nh: int, nkv: int, hd: int, inter: int, group: int):
    """The block function for one model's shapes (constants in its closure, not guarded ints)."""
    scale = hd ** -0.5

    def block(x, cos, sin, w_in, w_post, qkv_p, qkv_s, o_p, o_s, gu_p, gu_s, d_p, d_s,
              k_pool, v_pool, slot, first: int, n: int):
        return _block(x, cos, sin, w_in, w_post, qkv_p, qkv_s, o_p, o_s, gu_p, gu_s, d_p, d_s,
                      k_pool, v_pool, slot, first, n, eps, nh, nkv, hd, inter, group, scale)
    return block


def _block(x, cos, sin, w_in, w_post, qkv_p, qkv_s, o_p, o_s, gu_p, gu_s, d_p, d_s,
           k_pool, v_pool, slot, first, n, eps, nh, nkv, hd, inter, group, scale):
    """layers.rms_norm -> fused q/k/v -> joint rotary (layers.self_attention) -> the new key and
    value into the pool -> attention.attention over the pool's views -> o_proj + residual ->
    add_rms_norm -> gated_mlp + residual: decoder_block's ops for one token of one sequence."""
    h = rms_norm(x, w_in, eps)
    qkv = int4_mm(h, qkv_p, group, qkv_s)
    qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(1, nh + nkv, hd), cos, sin)
    q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, (nh + nkv) * hd:].view(1, nkv, hd)
    k_pool.index_copy_(0, slot, k)
    v_pool.index_copy_(0, slot, v)
    ks = k_pool[first:first + n].transpose(0, 1)
    vs = v_pool[first:first + n].transpose(0, 1)
    a = attention(q.transpose(0, 1), ks, vs, n - 1, scale=scale)
    x = x + int4_mm(a, o_p, group, o_s)
    h = rms_norm(x, w_post, eps)
    gu = int4_mm(h, gu_p, group, gu_s)
    gate, up = gu[:, :inter], gu[:, inter:]
    return x + int4_mm(F.silu(gate) * up, d_p, group, d_s)


class CompiledBlocks:
    """The compiled decode block of one Runner (module docstring). `compile_s`: seconds the
    first compiled call took (the compile), None before it; `failed`: the error that switched
    it off."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and enabled_by_env()
        self.failed: str | None = None
        self.compile_s: float | None = None
        self.calls = 0
        self._fns: dict[tuple, object] = {}

    def decoder_block(self, p: LlamaParams, weights: dict, x: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, batch: PassBatch, layer: int) -> torch.Tensor | None:
        """The block's output [1, hidden] where covered (module docstring), else None."""
        if not self.enabled or self.failed is not None:
            return None
        got = self._args(p, weights, x, batch, layer)
        if got is None:
            return None
        key, args = got
        fn = self._fns.get(key)
        if layer == 0:  # the embedding's rows can be a view of its table, later blocks' inputs are
            x = x.clone()  # not: Dynamo guards views apart (a second graph), so never a view
        start = None
        try:
            if fn is None:
                start = time.perf_counter()
                fn = torch.compile(_make_block(*key), dynamic=True, fullgraph=True)
                # the float constants (eps, the attention scale) as constants: traced as
                # symbolic floats, Dynamo restarts its analysis once (a second trace)
                with torch._dynamo.config.patch(specialize_float=True):
                    y = fn(x, cos, sin, *args)
                self._fns[key] = fn
            else:
                y = fn(x, cos, sin, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from now on
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("gdsllm: the compiled CPU decode block is off, running eager (%s)", self.failed)
            return None
        if start is not None:
            self.compile_s = (self.compile_s or 0.0) + time.perf_counter() - start
        self.calls += 1
        return y

    def warm_up(self, p: LlamaParams, weights: dict) -> None:
        """Compile now, over zeros of the shapes of `weights` (a block unit's stored views, whose
        bytes need not be loaded yet), so that no decode pass waits for the compiler: the
        start-up pays it (LLM's constructor, the compute worker before RunnerReady). A no-op
        where the block is not covered or already compiled."""
        if not self.enabled or self.failed is not None or self._fns:
            return
        parts = {n: weights.get(n) for n in (*FUSED[QKV], *FUSED[GATE_UP], O, DOWN)}
        if not all(isinstance(w, QuantWeight) and w.qtype == "int4" for w in parts.values()):
            return
        if not INT4_KERNEL or not fusable([parts[n] for n in FUSED[QKV]]):
            return
        zero = {n: QuantWeight(w.qtype, w.shape, w.group_size, torch.zeros_like(w.data),
                               torch.zeros_like(w.scales)) for n, w in parts.items()}
        dummy = {QKV: FusedInt4.of([zero[n] for n in FUSED[QKV]]),
                 GATE_UP: FusedInt4.of([zero[n] for n in FUSED[GATE_UP]]),
                 O: PackedInt4.of(zero[O]), DOWN: PackedInt4.of(zero[DOWN])}
        hidden, hd, nkv = p.hidden_size, p.head_dim, p.num_key_value_heads
        dummy.update({n: torch.ones(hidden) for n in NORMS})
        # Sizes and ints of values no real size has (Dynamo unifies equal sizes at the compile,
        # then guards their equality: a recompile at the first real pass): 7 blocks, the keys
        # slots 37..41, the slot a view of the pass's packed integers as a pass builds them.
        cache = PagedKVCache(1, nkv, hd, torch.float32, "cpu", 7)
        cache.k[0].zero_()
        cache.v[0].zero_()
        packed = torch.tensor([0, 4, 41, 0] + list(range(37, 42)))
        batch = PassBatch(cache, packed[2:3], [Segment(0, 1, 4, packed[4:], first=37)])
        cos, sin = rope_cos_sin(rope_inv_freq(p), torch.tensor([4]), torch.float32)
        self.decoder_block(p, dummy, torch.zeros(1, hidden), cos, sin, batch, 0)
        self.calls = 0  # `calls` counts the blocks of real passes

    @staticmethod
    def _args(p: LlamaParams, weights: dict, x: torch.Tensor, batch: PassBatch, layer: int):
        """The compiled block's arguments after x, cos, sin; None where it does not apply."""
        segs = batch.segments
        if (x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] != 1
                or segs is None or len(segs) != 1 or segs[0].first is None
                or segs[0].mask is not None or not covers_params(p)):
            return None
        qkv, gu, o, d = (weights.get(n) for n in (QKV, GATE_UP, O, DOWN))
        if not (isinstance(qkv, FusedInt4) and isinstance(gu, FusedInt4)
                and isinstance(o, PackedInt4) and isinstance(d, PackedInt4)
                and len(qkv.sizes) == 3 and len(gu.sizes) == 2
                and qkv.group_size == gu.group_size == o.group_size == d.group_size):
            return None
        norms = [weights.get(n) for n in NORMS]
        if any(not isinstance(w, torch.Tensor) or w.dtype != torch.float32 for w in norms):
            return None
        if any(name.endswith(".bias") for name in weights):
            return None
        seg, cache = segs[0], batch.cache
        hd, nkv = p.head_dim, p.num_key_value_heads
        k_pool = cache.k[layer].view(-1, nkv, hd)
        v_pool = cache.v[layer].view(-1, nkv, hd)
        if k_pool.dtype != torch.float32:
            return None
        key = (float(p.rms_norm_eps), p.num_attention_heads, nkv, hd, gu.sizes[0], qkv.group_size)
        return key, (norms[0], norms[1], qkv.packed, qkv.scales, o.packed, o.scales, gu.packed,
                     gu.scales, d.packed, d.scales, k_pool, v_pool, batch.slots, seg.first,
                     seg.keys.shape[0])
