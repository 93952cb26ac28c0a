"""A decoder block as ONE call for decode on the CPU: the same ops as gdsllm.models.layers in the
same order, without dispatching them one by one from Python. Two ways to make the call:

- scripted (the default): `_block` through TorchScript, run by its plain interpreter
  (`torch.jit.optimized_execution(False)`: no fusion, no specialization), so the block runs
  exactly the eager block's aten ops on the same tensors and its results are the eager block's
  bits (tests/test_cpu_compiled.py: every pass's logits, on a tiny model and the default model).
  Scripting takes ~0.2 s. What it saves is the Python between ~50 small ops a block: the default
  model's `LLM` decode, 8 interleaved rounds of 64 tokens in one process (benchmarks/
  ab_cpu_block.py, 2 threads, 2026-12-04 22:15 UTC, load 0.9-1.1), 86.7 against 76.3 tokens/s
  median, faster in every round (1.11-1.21x), the same text (docs/BENCHMARKS.md).
- compiled (`--cpu-compile`, `LLM(cpu_compile=True)`): `_block` through torch.compile (Inductor's
  C++ backend), 5-10 s at start-up and NOT always eager's bits (below).

    blocks = CompiledBlocks(inductor=False)    # one per Runner (CPU); made on first use
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

It is made once per process at start-up (`warm_up`, over zeros of the block's shapes, when the
Runner pins its first block unit), so no decode pass waits for it. If making or running the
call fails (no C++ compiler, an op Inductor does not take, a torch without TorchScript: 2.13
deprecates it), the error is logged once and every later block runs eager: never a crash.
GDSLLM_CPU_COMPILE=0 in the environment runs every block eager, whatever the options say.

Why the compiled form is off by default: the compile costs more than a short generation saves.
Measured 2026-12-04 19:10-19:16 UTC on the 2-vCPU AMD EPYC (torch 2.13, 2 threads, load average
0.7-1.2), the default model: the compile at start-up 8.9-10.2 s with Inductor's on-disk caches
cold, 5.2-6.5 s warm (of which 2.8 s importing torch._dynamo / torch._inductor, 1.5 s tracing,
1.7 s loading the cached kernels); `gdsllm generate -n 16` 10.4 s wall against 4.6 s eager. A
decode token saves about 3 ms (see docs/BENCHMARKS.md, issue 25), so the warm compile pays back
after about 2,000 tokens: a server or a long generation, not `generate -n 32`. Its numerics: on
a small random int4 model (hidden 128) every decode pass's logits are equal (torch.equal); on
the default model (hidden 576) Inductor's own reductions round differently: 64 greedy tokens
after "The capital of France is" are identical, after the benchmark's chat prompt they part at
the 33rd token (a near tie; 2026-12-04 19:30 UTC, measured with the block's earlier form, the
rotary by slices and the attention through `attention.attention`).
"""
from __future__ import annotations

import logging
import os
import time
import warnings

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import LlamaParams
from gdsllm.models.attention import PassBatch, Segment
from gdsllm.models.kv_cache import PagedKVCache
from gdsllm.models.layers import FUSED, rope_cos_sin, rope_flip_factors, rope_inv_freq
from gdsllm.quant.kernels_cpu import INT4_KERNEL, FusedInt4, PackedInt4, fusable
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
    """The block function for one model's shapes (constants in its closure, not guarded ints):
    what torch.compile compiles."""
    scale, gqa = hd ** -0.5, nh != nkv  # constants of the closure (a SymBool is no SDPA flag)

    def block(x, cos4, sin4, w_in, w_post, qkv_p, qkv_s, o_p, o_s, gu_p, gu_s, d_p, d_s,
              k_pool, v_pool, slot, first: int, n: int):
        return _block(x, cos4, sin4, w_in, w_post, qkv_p, qkv_s, o_p, o_s, gu_p, gu_s, d_p, d_s,
                      k_pool, v_pool, slot, first, n, eps, nh, nkv, hd, inter, group, scale, gqa)
    return block


def _block(x: torch.Tensor, cos4: torch.Tensor, sin4: torch.Tensor, w_in: torch.Tensor,
           w_post: torch.Tensor, qkv_p: torch.Tensor, qkv_s: torch.Tensor, o_p: torch.Tensor,
           o_s: torch.Tensor, gu_p: torch.Tensor, gu_s: torch.Tensor, d_p: torch.Tensor,
           d_s: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot: torch.Tensor,
           first: int, n: int, eps: float, nh: int, nkv: int, hd: int, inter: int, group: int,
           scale: float, gqa: bool) -> torch.Tensor:
    """decoder_block's ops for one token of one sequence, each as the eager code runs it on the
    CPU: layers.rms_norm (its float32 form) -> FusedInt4 q/k/v (kernels_cpu.int4_mm) -> the joint
    rotary embedding (layers.apply_rope_flip over the pass's rope_flip_factors cos4 / sin4) ->
    the new key and value into the layer's pool (PagedKVCache.write) -> SDPA over its strided
    views (attention._decode_span, PagedKVCache.span4) -> o_proj + residual -> add_rms_norm ->
    gated_mlp (SiLU) + residual. k_pool / v_pool: the layer's pools as allocated (cache.k[layer],
    [blocks, block_size, kv_heads, head_dim]). TorchScript-compatible (annotated, no Python
    objects): the scripted block runs exactly these ops, so its results are the eager block's
    bits."""
    h = w_in * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    qkv = torch.ops.aten._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16), qkv_p, group,
                                                     qkv_s).to(x.dtype)
    qk4 = qkv[:, : (nh + nkv) * hd].view(1, nh + nkv, 2, hd // 2)
    qk = (qk4 * cos4 + qk4.flip(2) * sin4).view(1, nh + nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].view(1, nkv, hd)
    k_pool.view(-1, nkv, hd).index_copy_(0, slot, qk[:, nh:])
    v_pool.view(-1, nkv, hd).index_copy_(0, slot, v)
    size, stride = [1, nkv, n, hd], [nkv * hd, hd, nkv * hd, 1]
    ks = k_pool.as_strided(size, stride, first * nkv * hd)
    vs = v_pool.as_strided(size, stride, first * nkv * hd)
    # q = qk[:, :nh] as _decode_span views it: [1, nh, 1, hd] with qk's strides (qk is new,
    # contiguous [1, nh + nkv, hd])
    q4 = qk.as_strided([1, nh, 1, hd], [nh * hd, hd, (nh + nkv) * hd, 1])
    a = F.scaled_dot_product_attention(q4, ks, vs, scale=scale, enable_gqa=gqa)
    a = a[0].transpose(0, 1).reshape(1, -1)
    x = x + torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16), o_p, group,
                                                       o_s).to(x.dtype)
    h = w_post * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    gu = torch.ops.aten._weight_int4pack_mm_for_cpu(h.to(torch.bfloat16), gu_p, group,
                                                    gu_s).to(x.dtype)
    m = F.silu(gu[:, :inter]) * gu[:, inter:]
    return x + torch.ops.aten._weight_int4pack_mm_for_cpu(m.to(torch.bfloat16), d_p, group,
                                                          d_s).to(x.dtype)


class CompiledBlocks:
    """The decode block of one Runner as one call (module docstring): scripted by TorchScript
    (the default: the eager block's bits), or with `inductor` compiled by torch.compile.
    `compile_s`: seconds making it took (the scripting, or the first compiled call), None
    before; `failed`: the error that switched it off; `calls`: blocks run through it."""

    def __init__(self, inductor: bool = False):
        self.enabled = enabled_by_env()
        self.inductor = inductor
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
        cos4, sin4 = batch.memo("rope_flip", rope_flip_factors, cos, sin)  # as self_attention
        fn = self._fns.get(key)
        if self.inductor and layer == 0:  # the embedding's rows can be a view of its table,
            x = x.clone()  # later blocks' inputs are not: Dynamo guards views apart (a 2nd graph)
        start = None
        try:
            if fn is None:
                start = time.perf_counter()
                fn = self._fns[key] = self._make(key)
            if not self.inductor:
                eps, nh, nkv, hd, inter, group = key
                with torch.jit.optimized_execution(False):  # the ops as written: no fusion
                    y = fn(x, cos4, sin4, *args, eps, nh, nkv, hd, inter, group, hd ** -0.5,
                           nh != nkv)
            elif start is not None:
                # the float constants (eps, the attention scale) as constants: traced as
                # symbolic floats, Dynamo restarts its analysis once (a second trace)
                with torch._dynamo.config.patch(specialize_float=True):
                    y = fn(x, cos4, sin4, *args)
            else:
                y = fn(x, cos4, sin4, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from now on
            self._fns.pop(key, None)
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("gdsllm: the %s CPU decode block is off, running eager (%s)",
                        "compiled" if self.inductor else "scripted", self.failed)
            return None
        if start is not None:
            self.compile_s = (self.compile_s or 0.0) + time.perf_counter() - start
        self.calls += 1
        return y

    def _make(self, key: tuple):
        if self.inductor:
            return torch.compile(_make_block(*key), dynamic=True, fullgraph=True)
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript (a fallback below)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_block)

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
        k_pool, v_pool = cache.k[layer], cache.v[layer]  # as allocated, as span4 reads them
        if k_pool.dtype != torch.float32 or k_pool.storage_offset() or v_pool.storage_offset():
            return None
        key = (float(p.rms_norm_eps), p.num_attention_heads, p.num_key_value_heads, p.head_dim,
               gu.sizes[0], qkv.group_size)
        return key, (norms[0], norms[1], qkv.packed, qkv.scales, o.packed, o.scales, gu.packed,
                     gu.scales, d.packed, d.scales, k_pool, v_pool, batch.slots, seg.first,
                     seg.keys.shape[0])
