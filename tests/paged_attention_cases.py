"""Random paged KV caches for tests/test_paged_attention.py, and the Triton interpreter check.

    case = make_case([1, 17, 50], heads=8, kv_heads=2, head_dim=16, block_size=16)
    out = decode_attention_ref(*case.args(), window=None)
    want = sdpa_per_sequence(case, window=None)      # the old path: SDPA over contiguous keys

    TRITON_INTERPRET=1 python3 tests/paged_attention_cases.py   # Triton (interpreted) vs the ref
    ptx = compile_sm90("fp16", group=4, head_dim=128)   # the kernel built for an H100/H200, no GPU

Run as a script (TRITON_INTERPRET=1 set before triton is imported, hence a process of its own),
it checks decode_attention_triton on CPU tensors against decode_attention_ref for a fixed list of
cases and prints one JSON line {"cases": n, "failures": [...], "max_err": x}; exit status 1 on
any failure.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triton_helpers import numpy24_interpreter_fix


@dataclass
class Case:
    q: torch.Tensor             # [B, H, D]
    k_pool: torch.Tensor        # [num_blocks, block_size, kv_heads, D]
    v_pool: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks], shuffled blocks, padding entries random
    seq_lens: torch.Tensor      # int32 [B]
    keys: list[torch.Tensor]    # per sequence: contiguous [kv_heads, len, D] (what was written)
    values: list[torch.Tensor]
    scale: float

    def args(self):
        return self.q, self.k_pool, self.v_pool, self.block_tables, self.seq_lens, self.scale


def make_case(lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
              dtype: torch.dtype = torch.float32, device: str = "cpu", extra_blocks: int = 3,
              seed: int = 0) -> Case:
    """Each sequence's keys/values written token by token into blocks taken from a shuffled
    free list; the pool has `extra_blocks` unused blocks of garbage, and every table row is
    padded to the longest with random (valid) block indices."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    max_blocks = max(max(need), 1)
    num_blocks = sum(need) + extra_blocks
    free = torch.randperm(num_blocks, generator=g).tolist()
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    tables = torch.randint(0, num_blocks, (len(lens), max_blocks), generator=g)
    keys, values = [], []
    for b, n in enumerate(lens):
        k = torch.randn(kv_heads, n, head_dim, generator=g)
        v = torch.randn(kv_heads, n, head_dim, generator=g)
        for i in range(need[b]):
            tables[b, i] = free.pop()
        pos = torch.arange(n)
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        k_pool.view(-1, kv_heads, head_dim)[slots] = k.transpose(0, 1)
        v_pool.view(-1, kv_heads, head_dim)[slots] = v.transpose(0, 1)
        keys.append(k.to(dtype).to(device))
        values.append(v.to(dtype).to(device))
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    return Case(q.to(dtype).to(device), k_pool.to(dtype).to(device), v_pool.to(dtype).to(device),
                tables.to(torch.int32).to(device),
                torch.tensor(lens, dtype=torch.int32, device=device), keys, values,
                head_dim ** -0.5)


def sdpa_per_sequence(case: Case, window: int | None = None) -> torch.Tensor:
    """The old path: per sequence, SDPA of its one query over its contiguous (windowed) keys,
    in float32. Returns [B, H * D] float32; a sequence of length 0 gives zeros."""
    rows = []
    heads, d = case.q.shape[1], case.q.shape[2]
    for b, (k, v) in enumerate(zip(case.keys, case.values)):
        n = k.shape[1]
        if n == 0:
            rows.append(torch.zeros(heads * d, device=case.q.device))
            continue
        first = 0 if window is None else max(0, n - window)
        k, v = k[:, first:].float(), v[:, first:].float()
        q = case.q[b].float()[None, :, None, :]  # [1, H, 1, D]
        rep = heads // k.shape[0]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 0)[None],
                                             v.repeat_interleave(rep, 0)[None], scale=case.scale)
        rows.append(out[0, :, 0, :].reshape(-1))
    return torch.stack(rows)


# (lens, heads, kv_heads, head_dim, block_size, dtype, window, num_splits, block_n)
INTERP_CASES = [
    ([1, 17, 50], 8, 2, 16, 16, torch.float32, None, 1, 16),       # GQA, one split
    ([1, 17, 50], 8, 2, 16, 16, torch.float32, None, 3, 16),       # split-K + merge
    ([33, 64, 5], 4, 4, 32, 16, torch.float32, None, 2, 32),       # MHA, tiles of 2 blocks
    ([70, 9, 40], 4, 1, 16, 8, torch.float32, 20, 1, 16),          # window, MQA, block 8
    ([70, 9, 40], 4, 1, 16, 8, torch.float32, 20, 4, 16),          # window + splits
    ([0, 30, 1], 6, 2, 24, 16, torch.float32, None, 2, 16),        # empty row, head_dim 24
    ([45, 3], 8, 2, 16, 16, torch.float16, None, 2, 16),           # half precision
    ([45, 3], 8, 2, 16, 16, torch.float16, 30, 1, 16),             # half precision, window
    ([100, 3, 260], 8, 2, 32, 16, torch.float32, None, None, None),  # default splits and tiles
]
# No bfloat16 here: triton 3.5's interpreter computes tl.dot of bfloat16 operands wrongly (a
# 16 x 16 x 16 product off by 1e10; loads and stores are right). The gpu test covers bfloat16.


def check_interpreted() -> dict:
    numpy24_interpreter_fix()
    from gdsllm.models.paged_attention import decode_attention_ref, decode_attention_triton
    failures, worst = [], 0.0
    for i, (lens, h, kvh, d, bs, dtype, window, splits, bn) in enumerate(INTERP_CASES):
        case = make_case(lens, h, kvh, d, bs, dtype, seed=i)
        got = decode_attention_triton(*case.args(), window, num_splits=splits, block_n=bn)
        splits = splits or "auto"
        ref = decode_attention_ref(*case.args(), window)
        err = (got.float() - ref.float()).abs().max().item()
        worst = max(worst, err)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        if not (err <= tol) or got.shape != ref.shape or got.dtype != case.q.dtype:
            failures.append(f"case {i} {lens} dtype={dtype} window={window} splits={splits}: "
                            f"max abs err {err:.3g} > {tol}, shape {tuple(got.shape)}")
    return {"cases": len(INTERP_CASES), "failures": failures, "max_err": worst}


if __name__ == "__main__":
    result = check_interpreted()
    print(json.dumps(result))
    sys.exit(1 if result["failures"] else 0)


def compile_sm90(dtype: str, group: int, head_dim: int, split: bool = True) -> str:
    """The decode kernel compiled for sm_90 (Hopper) on any machine, with the launch options
    decode_attention_triton picks and the specialisations Triton's launcher would make (16-byte
    aligned pointers and strides); returns the PTX. Catches what the interpreter does not
    (layouts, tl.dot shapes, register allocation: ptxas runs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gdsllm.models import paged_attention as pa
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    block_n, warps, stages = pa._config(head_dim, tdtype)
    ptrs = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "bt_ptr": "i32", "len_ptr": "i32",
            "out_ptr": dtype, "part_ptr": "fp32" if split else dtype,
            "lse_ptr": "fp32" if split else dtype}
    sig = {name: "*" + t for name, t in ptrs.items()}
    sig.update({name: "i32" for name in ("stride_qb", "stride_qh", "stride_kb", "stride_ko",
                                         "stride_kh", "stride_bt")})
    sig.update(qk_scale="fp32", window="i32", num_splits="i32")
    const = dict(group=group, head_dim=head_dim, BLOCK_SIZE=16, SPLIT=split, BLOCK_N=block_n,
                 BLOCK_G=max(16, pa._pow2(group)), BLOCK_D=max(16, pa._pow2(head_dim)),
                 IEEE=dtype == "fp32")
    sig.update({name: "constexpr" for name in const})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(14)}  # pointers and strides
    src = ASTSource(pa._decode_kernel, sig, const, aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    return kernel.asm["ptx"]
