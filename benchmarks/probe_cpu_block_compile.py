"""Probe (issue 25): one SmolLM2-shaped decoder block at decode (1 token), eager against torch.compile'd as one
call, on the CPU: int4 projections through torch's _weight_int4pack_mm_for_cpu (bfloat16 in,
float32 out, as gdsllm's PackedInt4), float32 norms / rotary / attention over a contiguous KV cache; 30 blocks a token, 64 tokens (random
weights: timing, and the compiled block's bits against eager's). Not GdsLLM's code: a minimal block
of the same ops, to measure what compiling a whole block (one call, Inductor's C++ backend) saves
against dispatching its ~65 torch ops one by one.

    OMP_NUM_THREADS=2 python3 benchmarks/probe_cpu_block_compile.py
"""
import time

import torch
import torch.nn.functional as F
torch.manual_seed(0)
H, NH, NKV, HD, I, G = 576, 9, 3, 64, 1536, 32
CTX = 512

def pack(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.randn(k // G, n, 2, dtype=torch.bfloat16) * 0.01
    return packed, sz

W = {"qkv": pack(NH * HD + 2 * NKV * HD, H), "o": pack(H, NH * HD), "gu": pack(2 * I, H), "d": pack(H, I)}
w_in, w_post = torch.randn(H), torch.randn(H)

def mm4(x, name):
    p, sz = W[name]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), p, G, sz).float()

def rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

def block(x, kc, vc, pos: torch.Tensor, n: int, cos, sin):
    h = rms(x, w_in)
    qkv = mm4(h, "qkv")
    q = qkv[:, : NH * HD].view(1, NH, HD)
    k = qkv[:, NH * HD: (NH + NKV) * HD].view(1, NKV, HD)
    v = qkv[:, (NH + NKV) * HD:].view(1, NKV, HD)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    kc.index_copy_(1, pos, k.transpose(0, 1))
    vc.index_copy_(1, pos, v.transpose(0, 1))
    a = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kc[:, :n].unsqueeze(0),
                                       vc[:, :n].unsqueeze(0), enable_gqa=True)
    x = x + mm4(a.reshape(1, NH * HD), "o")
    h = rms(x, w_post)
    g, u = mm4(h, "gu").split(I, -1)
    return x + mm4(F.silu(g) * u, "d")

def run(f, layers=30, tokens=64):
    kcs = [torch.zeros(NKV, CTX, HD) for _ in range(layers)]
    vcs = [torch.zeros(NKV, CTX, HD) for _ in range(layers)]
    x = torch.randn(1, H)
    cos, sin = torch.randn(1, 1, HD), torch.randn(1, 1, HD)
    t = time.perf_counter()
    for p in range(tokens):
        pos = torch.tensor([p])
        for l in range(layers):
            x = f(x, kcs[l], vcs[l], pos, p + 1, cos, sin)
        x = x / x.norm()
    return (time.perf_counter() - t) / tokens * 1e3

torch.set_num_threads(2)
print("eager ms/token (30 blocks):", [round(run(block), 2) for _ in range(3)])
t = time.perf_counter()
cb = torch.compile(block, dynamic=True)
run(cb, tokens=4)
print("compile s", round(time.perf_counter() - t, 1))
print("compiled ms/token (30 blocks):", [round(run(cb), 2) for _ in range(3)])
print("eager again:", [round(run(block), 2) for _ in range(2)])
kc, vc = torch.zeros(NKV, CTX, HD), torch.zeros(NKV, CTX, HD)
kc2, vc2 = kc.clone(), vc.clone()
x0, cs, sn = torch.randn(1, H), torch.randn(1, 1, HD), torch.randn(1, 1, HD)
for p in range(8):
    a = block(x0, kc, vc, torch.tensor([p]), p + 1, cs, sn)
    b = cb(x0, kc2, vc2, torch.tensor([p]), p + 1, cs, sn)
print("max |compiled - eager| after 8 positions:", float((a - b).abs().max()), "of", float(a.abs().max()))
