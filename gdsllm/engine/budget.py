"""The VRAM budget: one ledger for every claim on device memory, the same rules for `gdsllm.LLM`
and `gdsllm serve`, and sizes as users write them.

    plan = plan_memory(meta, device="cuda", vram_budget=parse_size("8GiB"), window=2,
                       draft=draft_meta, free_bytes=free_device_bytes("cuda"))
    plan.weights          # ResidencyPlan: resident units + `window` streaming slots (the arena)
    plan.expert_slots     # a mixture of experts: routed experts' slots after the dense part
    plan.draft_bytes      # a resident draft model, taken first
    plan.scratch_bytes    # quantized models: the one dequantization buffer (largest weight, or
                          # q+k+v: dequant_numel) and the split-K counters
    kv_tokens(...)        # the paged KV cache, sized from what is left once the arena exists
    print("\n".join(plan.describe(kv)))   # `gdsllm info --vram-budget X`

The order in which the budget is spent, in one place: the draft's weights first (it runs every
pass), then the target's weights (gdsllm.engine.planner: embed and head, then blocks, beside
`window` slots for what streams; gdsllm.engine.experts for a mixture of experts' slots), then the
KV cache out of the memory left: KV_FIT of it on CUDA (the rest is the activations' and CUDA
graphs' room), KV_FIT_CPU of MemAvailable on the CPU, never more than `max_batch` whole contexts,
the draft's cache (it holds the same sequences) counted per token. With no --vram-budget the
weights may take FIT of the free device memory: everything is resident when the model fits there,
else that much is pinned and the rest streams.
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB' -> 8589934592, '500MB' -> 500000000, '4096' -> 4096 (bytes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 500MB, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


FIT = 0.9  # share of the free device memory the weights may take when no budget is given
KV_FIT = 0.9  # share of the device memory left after the weights that the KV cache may take
KV_FIT_CPU = 0.5  # share of MemAvailable the KV cache may take on the CPU backend
DEFAULT_WINDOW = 2  # streaming slots (--prefetch-window), LLM and serve alike
DEFAULT_MAX_BATCH = 16  # sequences one pass serves (--max-batch): the KV cache holds as many contexts


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_free_bytes(index: int) -> int | None:
    """Free memory of GPU `index` through NVML: no CUDA context is created (the coordinator plans
    before any worker exists and must not hold a context of its own)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        handle, mem = ctypes.c_void_p(), _NvmlMemory()
        if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
            return None
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
            return None
        return int(mem.free)
    finally:
        nvml.nvmlShutdown()


def free_device_bytes(device: str) -> int | None:
    """Bytes free on `device` ("cpu", "cuda", "cuda:N"): MemAvailable on the CPU; on CUDA what the
    driver reports (torch's count when this process already holds a context, NVML otherwise);
    None when it cannot be known."""
    kind, _, idx = str(device).partition(":")
    if kind == "cpu":
        try:
            return host_available_bytes()
        except OSError:
            return None
    index = int(idx or 0)
    import torch
    if torch.cuda.is_initialized():
        return torch.cuda.mem_get_info(index)[0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(ids) or not ids[index].isdigit():
            return None  # UUIDs or MIG names: NVML's indices are not these
        index = int(ids[index])
    return _nvml_free_bytes(index)


def weights_budget(asked: int | None, total_bytes: int, free_bytes: int | None) -> int | None:
    """Bytes the weights may take: what was asked; with nothing asked, None (everything resident)
    when the model fits in FIT of the free memory (or that is unknown), else that share."""
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, int) or asked <= 0:
            raise ValueError(f"the VRAM budget (--vram-budget) must be a positive number of bytes, got {asked!r}")
        return asked
    if free_bytes is None:
        return None
    room = int(free_bytes * FIT)
    return None if total_bytes <= room else room


@dataclass(frozen=True)
class MemoryPlan:
    """What the budget holds: the draft, the target's weights (and expert slots), in that order."""

    budget: int | None  # the bytes for weights this plan was made for (None: no limit)
    draft_bytes: int
    weights: "object"  # gdsllm.engine.planner.ResidencyPlan
    expert_slots: "object | None"  # gdsllm.engine.experts.ExpertSlots
    scratch_bytes: int = 0  # the quantized matmuls' buffer and counters (gdsllm.quant.kernels_cuda)

    @property
    def device_bytes(self) -> int:
        """Weights' device memory: the arena (resident units, streaming and expert slots), the draft
        and the dequantization scratch."""
        return self.weights.arena_bytes + self.draft_bytes + self.scratch_bytes

    def describe(self, meta, kv: int | None = None, kv_token_bytes: int | None = None) -> list[str]:
        """The plan in words, for `gdsllm info` and the start-up log."""
        w = self.weights
        mib = 1 << 20
        out = [f"vram budget   {'none (everything resident)' if self.budget is None else f'{self.budget / mib:,.1f} MiB'}"]
        if self.draft_bytes:
            out.append(f"draft         {self.draft_bytes / mib:,.1f} MiB resident, taken first")
        names = w.resident_names
        out.append(f"resident      {len(names)} of {len(w.streamed) + len(names)} units, "
                   f"{w.resident_bytes / mib:,.1f} MiB" + (f": {_span(names)}" if names else ""))
        if w.streamed:
            out.append(f"streamed      {len(w.streamed)} units, {w.streamed_bytes_per_pass / mib:,.1f} MiB "
                       f"read per pass, through {w.num_slots} slot(s) of {w.slot_bytes / mib:,.1f} MiB "
                       f"(--prefetch-window {w.window})")
        else:
            out.append("streamed      none")
        if self.expert_slots is not None:
            es = self.expert_slots
            n = sum(1 for u in meta.units if u.kind == "expert")
            out.append(f"expert slots  {es.count} of {n} experts, {es.nbytes / mib:,.1f} MiB "
                       f"({es.slot_bytes / mib:,.2f} MiB each); only routed experts are read")
        out.append(f"arena         {w.arena_bytes / mib:,.1f} MiB of device memory for weights "
                   f"(+ {self.draft_bytes / mib:,.1f} MiB draft)" if self.draft_bytes else
                   f"arena         {w.arena_bytes / mib:,.1f} MiB of device memory for weights")
        if self.scratch_bytes:
            out.append(f"scratch       {self.scratch_bytes / mib:,.1f} MiB: the largest quantized "
                       f"weight (or q+k+v) dequantized, for matmuls of many rows, "
                       f"and the split-K counters")
        if kv is not None:
            out.append(f"kv cache      {kv:,} tokens" + (f", {kv * kv_token_bytes / mib:,.1f} MiB"
                                                        if kv_token_bytes else ""))
        return out


def _span(names: list[str]) -> str:
    """["embed", "block.0", "block.1", "block.2", "head"] -> "embed, block.0-2, head"."""
    out, run = [], []
    for n in names + [""]:
        if n.startswith("block.") and n.count(".") == 1 and (
                not run or int(n.split(".")[1]) == int(run[-1].split(".")[1]) + 1):
            run.append(n)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}-{run[-1].split('.')[1]}")
            run = []
        if n.startswith("block.") and n.count(".") == 1:
            run = [n]
        elif n:
            out.append(n)
    return ", ".join(out)


def dequant_numel(metas) -> int:
    """Values of the buffer quantized matmuls dequantize into (gdsllm.quant.kernels_cuda
    `scratch`, per device and compute dtype); 0 when nothing is quantized. The largest quantized
    tensor of these models, or q, k and v of one block together where larger (kernels_cuda
    `linears` dequantizes them into it one after another, for one matmul: LLaMA-7B's 50M values
    against 45M for its largest projection, less than the largest where keys and values have
    fewer heads). Gate and up together would double the buffer: they share it only where it is
    that large already (an int8 LM head larger than both, as LLaMA-7B's 131M values)."""
    from gdsllm.models.layers import FUSED
    qkv = FUSED["self_attn.qkv_proj.weight"]
    most = 0
    for u in (u for m in metas if m is not None for u in m.units):
        quantized = {t.name: t for t in u.tensors if t.quant is not None}
        most = max(most, *(t.numel for t in quantized.values()), 0)
        ts = [quantized.get(n) for n in qkv]
        if all(ts) and len({(t.quant.qtype, t.shape[1], t.quant.group_size) for t in ts}) == 1:
            most = max(most, sum(t.numel for t in ts))
    return most


def scratch_bytes(metas, itemsize: int = 2) -> int:
    """Bytes the quantized matmuls keep on a device: the dequantization buffer (`dequant_numel`
    values at `itemsize` bytes, the compute dtype's) and the split-K tile counters (int32); 0 when
    nothing is quantized."""
    from gdsllm.quant.kernels_cuda import SPLIT_K_COUNTERS
    n = dequant_numel(metas)
    return itemsize * n + 4 * SPLIT_K_COUNTERS if n else 0


def plan_memory(meta, *, budget: int | None, window: int = DEFAULT_WINDOW, draft=None,
                itemsize: int = 2) -> MemoryPlan:
    """The ledger's weights: the draft (a ModelMeta, checked against the target by the caller)
    first, then the target's plan in what is left; beside them the dequantization scratch (at
    `itemsize` bytes a value), which the weights' budget does not pay for. ValueError naming the
    smallest budget that works."""
    from gdsllm.engine.planner import plan_for
    draft_bytes = draft.total_bytes if draft is not None else 0
    left = budget
    if budget is not None and draft is not None:
        left = budget - draft_bytes
        if left <= 0:
            raise ValueError(f"the draft model {draft.root} needs {draft_bytes} bytes, the whole VRAM "
                             f"budget of {budget} bytes: raise --vram-budget or pick a smaller draft")
    if meta.params.num_experts:
        from gdsllm.engine.experts import plan_moe
        weights, slots = plan_moe(meta, left, window)
    else:
        weights, slots = plan_for(meta, left, window), None
    return MemoryPlan(budget, draft_bytes, weights, slots, scratch_bytes((meta, draft), itemsize))


def kv_tokens(params, itemsize: int, *, device: str, free_bytes: int | None, kv_budget: int | None = None,
              max_batch: int = DEFAULT_MAX_BATCH, extra_per_token: int = 0) -> int:
    """Tokens of the paged KV cache: `kv_budget` bytes, or KV_FIT of `free_bytes` (the device memory
    left once the weights are allocated) on CUDA, KV_FIT_CPU of MemAvailable on the CPU; at most
    `max_batch` contexts of the model, at least one block. `extra_per_token`: bytes another cache
    holding the same sequences adds per token (a draft model's)."""
    from gdsllm.models.kv_cache import BLOCK_SIZE, kv_bytes_per_token
    budget = kv_budget
    if budget is None:
        if str(device).startswith("cpu") or free_bytes is None:
            budget = int(host_available_bytes() * KV_FIT_CPU)
        else:
            budget = int(free_bytes * KV_FIT)
    per_token = kv_bytes_per_token(params, itemsize) + extra_per_token
    return max(BLOCK_SIZE, min(budget // per_token, max_batch * params.max_position_embeddings))
