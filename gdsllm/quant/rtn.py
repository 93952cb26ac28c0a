"""Group-wise asymmetric round-to-nearest: a float weight into an int4 or int8 QTensor.

Per group of `group_size` consecutive inputs of a row, the range [min, max] is split into 15
(int4) or 255 (int8) equal steps: s = (max - min) / steps, z = the value of the middle code
(int4: q = 8; int8: q = 0). s and z are rounded to the dtype they are stored in FIRST and q is
chosen against the rounded pair, so what is stored is the nearest code to each weight under the
scales the kernels will actually use.

    qt = quantize(w, "int4", group_size=64, where="block.3 mlp.up_proj.weight")

Calibration-free refinement (in the spirit of HQQ, which also improves scale and zero without
data): `refine` rounds of alternating minimization, each refitting (s, z) of every group to its
codes by least squares and re-rounding the codes. Measured on SmolLM2-135M re-quantized from its
float conversion to int4 in groups of 64, GPL-3, 2 windows of 512 tokens: perplexity 31.38 with
plain RTN, 27.32 with 3 rounds (float: 21.09); relative weight MSE of one down_proj 0.62% -> 0.50%.
So the writer refines (REFINE rounds); `refine=0` is plain RTN.

Same bytes on every device: every step is an elementwise IEEE operation (no scalar divisor, which
CUDA turns into a multiplication by its reciprocal) and every per-group sum is a fixed halving
tree (`group_sum`), never a library reduction whose order depends on the device or the thread
count. So `quantize(w, ..., device="cuda")`, which a 7B model needs (minutes on a CPU, seconds on
a GPU), writes exactly the bytes of the CPU path. Rows go through in chunks that stay in cache.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from gdsllm.quant.schemes import SCALE_DTYPE, QTensor, check_shape

STEPS = {"int4": 15, "int8": 255}
REFINE = 3  # measured above
CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}  # float32 elements per chunk of rows


def group_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension (a power of two) by halving: the same additions in the same
    order on every device and thread count."""
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        x = x[:h] + x[h:]
    return x[0]


def _codes(g, s, z, qtype):
    """round((g - z) / s) clamped, relative to the middle code (float32, g's layout)."""
    lo, hi = (-8, 7) if qtype == "int4" else (-128, 127)
    c = g - z
    c.div_(s.expand_as(c)).round_().clamp_(lo, hi)
    return c


def _refit(gc, wm, c, inv):
    """Least-squares (s, z) of each group for fixed codes c: w ~ c * s + z (gc = g - mean g)."""
    cm = group_sum(c) * inv
    cc = c.sub_(cm)
    var = group_sum(cc * cc)
    s = group_sum(cc.mul_(gc)) / var.clamp_min(1e-12)
    return s, wm - s * cm, var > 0


def _quantize_groups(g: torch.Tensor, qtype: str, refine: int) -> tuple[torch.Tensor, ...]:
    """g float32 [group_size, groups] (one group per column) -> (codes, s, z)."""
    inv = 1.0 / g.shape[0]  # a power of two: exact
    lo, hi = g.amin(0), g.amax(0)
    s = (hi - lo) / torch.full_like(hi, STEPS[qtype])
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: any scale, q lands on z
    z = lo + (8 if qtype == "int4" else 128) * s  # the middle code's value
    if refine:
        wm = group_sum(g) * inv
        gc = g - wm
        for _ in range(refine):
            s2, z2, ok = _refit(gc, wm, _codes(g, s, z, qtype), inv)
            ok &= s2 > 0
            s, z = torch.where(ok, s2, s), torch.where(ok, z2, z)
    sd = SCALE_DTYPE[qtype]
    s, z = s.to(sd).float(), z.to(sd).float()
    q = _codes(g, s, z, qtype)
    q = (q + 8).to(torch.uint8) if qtype == "int4" else q.to(torch.int8)
    return q, s, z


def quantize(w: torch.Tensor, qtype: str, group_size: int, where: str = "weight",
             refine: int = REFINE, device: str | torch.device | None = None) -> QTensor:
    """RTN-quantize the float weight `w` [N, K]; ValueError naming `where` on a bad shape.
    `refine` rounds of least-squares refitting of (s, z) to the codes, then re-rounding.
    `device`: where to compute (default: w's); the QTensor's tensors stay there."""
    check_shape(qtype, tuple(w.shape), group_size, where)
    n, k = w.shape
    dev = torch.device(device) if device is not None else w.device
    step = max(1, CHUNK.get(dev.type, CHUNK["cuda"]) // k)

    def chunk(r: int) -> tuple[torch.Tensor, ...]:
        rows = w[r: r + step].detach().to(dev)
        m = rows.shape[0] * (k // group_size)
        g = rows.reshape(m, group_size).t().to(torch.float32).contiguous()  # [group_size, m]
        q, s, z = _quantize_groups(g, qtype, refine)
        return q.t().reshape(-1, k), s.view(-1, k // group_size), z.view(-1, k // group_size)

    starts = range(0, n, step)
    threads = torch.get_num_threads()
    if dev.type != "cpu" or threads == 1 or len(starts) == 1:
        parts = [chunk(r) for r in starts]
    else:  # small chunks, one thread each: torch's own threads would split every small op
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(chunk, starts))
        finally:
            torch.set_num_threads(threads)
    q, s, z = (torch.cat(x) for x in zip(*parts))
    return QTensor(qtype, q, s, z, group_size)
