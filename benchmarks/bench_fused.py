"""A decoder block's elementwise work on CUDA: torch (gdsllm.models.layers' code) against the
fused Triton kernels (gdsllm.models.fused), in microseconds per block, as CUDA-graph replays.

    python3 benchmarks/bench_fused.py --out /tmp/fused.json [--batch 1 16] [--ctx 512]

LLaMA-7B's block (hidden 4096, MLP 11008, 32 heads of 128, float16), one token per sequence
(decode), for each --batch:
- `elementwise_us`: what a block does besides its matmuls and attention (input norm, rotary on
  q and k, residual add + post-attention norm, silu(gate) * up, the last residual add), through
  the same layers calls `gdsllm.models.llama.decoder_block` makes, with the kernels switched off
  (`torch`) and on (`fused`). --per-graph blocks' worth (different buffers each) are captured in
  one CUDA graph and the replay time divided by them;
- `block_us`: the whole `decoder_block` (random weights, a paged KV cache with --ctx tokens per
  sequence), one block per graph;
- `gpu_ops`: the CUDA kernels (and copies) one eager block launches, counted by torch.profiler;
- `max_err`: the largest difference of the block's output, fused against torch.
Timed with CUDA events after warm-up replays, the median of --repeats runs of --iters replays.
Prints one JSON line per batch on stderr, and the whole object on stdout and to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without PYTHONPATH
from gdsllm.format.metadata import LlamaParams, unit_tensor_shapes  # noqa: E402
from gdsllm.models import fused, layers, llama  # noqa: E402
from gdsllm.models.attention import PassBatch  # noqa: E402
from gdsllm.models.kv_cache import PagedKVCache  # noqa: E402

P = LlamaParams(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
DTYPE = torch.float16
BLOCK = 16


def elementwise_inputs(batch: int, g: torch.Generator) -> dict:
    """The tensors one block's elementwise work reads: what the matmuls would have made."""
    h, f, nh, hd = P.hidden_size, P.intermediate_size, P.num_attention_heads, P.head_dim
    kw = dict(device="cuda", generator=g)
    t = {name: torch.randn(*shape, **kw).to(DTYPE) for name, shape in (
        ("x", (batch, h)), ("attn", (batch, h)), ("mlp", (batch, h)), ("gate", (batch, f)),
        ("up", (batch, f)), ("q", (batch, nh, hd)), ("k", (batch, nh, hd)))}
    t["w1"] = (1 + 0.1 * torch.randn(h, **kw)).to(DTYPE)
    t["w2"] = (1 + 0.1 * torch.randn(h, **kw)).to(DTYPE)
    inv = layers.rope_inv_freq(P).cuda()
    t["cos"], t["sin"] = layers.rope_cos_sin(inv, torch.full((batch,), 300, device="cuda"), DTYPE)
    return t


def elementwise(t: dict) -> torch.Tensor:
    """decoder_block's calls between its matmuls, in its order."""
    eps = P.rms_norm_eps
    layers.rms_norm(t["x"], t["w1"], eps)
    layers.apply_rope_qk(t["q"], t["k"], t["cos"], t["sin"])
    x, _ = layers.add_rms_norm(t["x"], t["attn"], t["w2"], eps)
    layers.act_mul("silu", t["gate"], t["up"])
    return x + t["mlp"]


def block_case(batch: int, ctx: int, g: torch.Generator):
    """run(): llama.decoder_block over random 7B weights and a paged KV cache of `ctx`
    tokens per sequence, decoding one token each (as a decode pass's PassBatch)."""
    kw = dict(device="cuda", generator=g)
    weights = {n: ((1 + 0.1 * torch.randn(s, **kw)) if "norm" in n else 0.02 * torch.randn(s, **kw))
               .to(DTYPE) for n, s in unit_tensor_shapes(P, "block").items()}
    per = -(-ctx // BLOCK)
    cache = PagedKVCache(1, P.num_key_value_heads, P.head_dim, DTYPE, "cuda",
                         num_blocks=batch * per + 1, block_size=BLOCK)
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    tables = (1 + torch.randperm(batch * per, **kw)).view(batch, per).to(torch.int32)
    slots = tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK
    pb = PassBatch(cache, slots, block_tables=tables,
                   seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"))
    cos, sin = layers.rope_cos_sin(layers.rope_inv_freq(P).cuda(),
                                   torch.full((batch,), ctx - 1, device="cuda"), DTYPE)
    x = torch.randn(batch, P.hidden_size, **kw).to(DTYPE)
    return lambda: llama.decoder_block(P, weights, x, cos, sin, pb, 0)


def graph_us(fns: list, iters: int, repeats: int) -> float:
    """Microseconds per call: the calls `fns` captured in one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fns[0]()  # compiles the Triton kernels, sets up cuBLAS, outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) * 1000 / (iters * len(fns)))
    return statistics.median(runs)


def gpu_ops(fn) -> int:
    """CUDA kernels, copies and sets one eager fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def bench_batch(a, batch: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(batch)
    # each captured block's work reads its own buffers, as the blocks of a model do
    blocks = [lambda t=elementwise_inputs(batch, g): elementwise(t) for _ in range(a.per_graph)]
    run_block = block_case(batch, a.ctx, g)
    row = {"batch": batch, "elementwise_us": {}, "block_us": {}, "gpu_ops": {}}
    outs = {}
    for mode in ("torch", "fused"):
        fused.ENABLED = mode == "fused"
        row["elementwise_us"][mode] = round(graph_us(blocks, a.iters, a.repeats), 2)
        row["block_us"][mode] = round(graph_us([run_block], a.iters, a.repeats), 2)
        row["gpu_ops"][mode] = {"elementwise": gpu_ops(blocks[0]), "block": gpu_ops(run_block)}
        outs[mode] = run_block().float()
    fused.ENABLED = True
    row["max_err"] = (outs["fused"] - outs["torch"]).abs().max().item()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--ctx", type=int, default=512, help="cached tokens per sequence (block_us)")
    ap.add_argument("--per-graph", type=int, default=32,
                    help="blocks' elementwise work captured in one graph")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused: needs a CUDA GPU", file=sys.stderr)
        return 2
    if fused.triton is None:
        print("bench_fused: needs triton (pip install triton)", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": fused.triton.__version__, "dtype": "float16", "ctx": a.ctx,
           "results": []}
    for batch in a.batch:
        row = bench_batch(a, batch)
        res["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    text = json.dumps(res)
    a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
