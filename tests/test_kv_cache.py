"""The paged KV cache, the batched decode path and the CUDA graphs of the Runner.

Blocks are handed out and taken back exactly; a decode pass (batched paged attention, on CUDA a
graph replay) gives the logits of the per-sequence path; a full pool is a clear error that leaks
nothing; on CUDA, graphs on and off give the same tokens, with padding rows (a batch of 3 runs
in the bucket of 4) and with streamed units between the pinned runs.

    python3 -m pytest tests/test_kv_cache.py
"""
from __future__ import annotations

import pytest
import torch

from gdsllm.models.kv_cache import SCRATCH_BLOCK, KVCacheFull, PagedKVCache, blocks_for
from gdsllm.engine.runner import Runner
from llama_ref import greedy_runner, load, rel_err, resident_weights, run_pass, synth_model

PROMPTS = [[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 7, 9, 11, 13, 15, 17, 19],
           [1, 300, 17], [5]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, d = synth_model(tmp_path_factory.mktemp("kv"), seed=3, num_attention_heads=4,
                       num_key_value_heads=2)
    meta = load(d)
    return meta, resident_weights(meta)


def test_blocks_are_handed_out_and_taken_back():
    c = PagedKVCache(2, 2, 4, torch.float32, "cpu", num_blocks=5, block_size=4)
    assert c.free_blocks == 4  # block 0 is scratch
    c.grow(7, 5)  # 5 tokens: 2 blocks
    assert len(c.tables[7]) == 2 and SCRATCH_BLOCK not in c.tables[7] and c.free_blocks == 2
    c.advance(7, 5)
    c.grow(7, 3)  # 8 tokens fit the 2 blocks it has
    assert len(c.tables[7]) == 2
    c.grow(8, 8)
    assert c.free_blocks == 0
    with pytest.raises(KVCacheFull, match=r"sequence 9: the KV cache needs 1 more blocks of 4 tokens "
                                          r"and has 0 free of 4"):
        c.grow(9, 1)
    c.free(7)
    assert c.free_blocks == 2 and 7 not in c and c.length(7) == 0
    c.free(7)  # unknown: a no-op
    assert c.free_blocks == 2
    assert blocks_for(17, 16) == 2 and blocks_for(16, 16) == 1


def test_slots_address_the_tokens_written():
    c = PagedKVCache(1, 2, 3, torch.float32, "cpu", num_blocks=8, block_size=4)
    c.grow(1, 6)
    c.grow(2, 3)
    slots = torch.tensor(c.slot_list(1, 0, 6) + c.slot_list(2, 0, 3))
    k = torch.arange(9 * 2 * 3, dtype=torch.float32).view(9, 2, 3)
    c.write(0, slots, k, -k)
    c.advance(1, 6)
    c.advance(2, 3)
    ks, vs = c.gather(0, torch.tensor(c.slot_list(1, 2, 6)))
    assert torch.equal(ks, k[2:6].transpose(0, 1)) and torch.equal(vs, -k[2:6].transpose(0, 1))
    c.truncate(1, 4)  # rolled back: the next token overwrites position 4, the blocks stay
    assert c.length(1) == 4 and len(c.tables[1]) == 2
    assert c.table_row(2, 4) == c.tables[2] + [SCRATCH_BLOCK] * 3


def test_consecutive_slots_read_as_views():
    """Keys at consecutive slots (pass_state.consecutive finds them) read through `span` as views
    of the pool, equal to what `gather` copies; slots that jump (a second sequence's blocks
    between) are not consecutive."""
    from gdsllm.engine.pass_state import consecutive
    c = PagedKVCache(1, 2, 3, torch.float32, "cpu", num_blocks=8, block_size=4)
    c.grow(1, 4)
    c.grow(2, 4)
    c.advance(1, 4)
    c.grow(1, 3)  # sequence 1's second block comes after sequence 2's
    one, two = c.slot_list(1, 0, 7), c.slot_list(2, 0, 4)
    k = torch.randn(11, 2, 3)
    c.write(0, torch.tensor(one + two), k, 2 * k)
    assert consecutive(two) == two[0] and consecutive(one[:4]) == one[0]
    assert consecutive(one) is None and consecutive([3, 5, 5]) is None and consecutive([7]) == 7
    ks, vs = c.span(0, two[0], 4)
    gk, gv = c.gather(0, torch.tensor(two))
    assert torch.equal(ks, gk) and torch.equal(vs, gv) and torch.equal(ks, k[7:].transpose(0, 1))
    assert ks.data_ptr() == c.k[0].view(-1, 2, 3)[two[0]].data_ptr()  # a view, no copy
    k4, v4 = c.span4(0, two[0], 4)  # the same views with a batch dimension, one view op each
    assert k4.shape == (1, 2, 4, 3) and k4.stride() == ks[None].stride()
    assert torch.equal(k4[0], ks) and torch.equal(v4[0], vs) and k4.data_ptr() == ks.data_ptr()


def test_the_cpu_decode_shortcuts_give_the_same_bits():
    """The CPU decode's shortcuts give bit for bit what they replace: the rotary embedding by
    one flip (layers.apply_rope_flip) and one token's attention over consecutive keys
    (attention._decode_span), grouped heads and a window wider than the keys."""
    from gdsllm.models import attention, layers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12 * 64 + 7, generator=g)[:, :12 * 64].view(3, 12, 64)  # a strided view
    cos, sin = layers.rope_cos_sin(1 / 10000 ** (torch.arange(0, 64, 2) / 64),
                                   torch.tensor([5, 77, 1000]), torch.float32)
    assert torch.equal(layers.apply_rope_flip(x, *layers.rope_flip_factors(cos, sin)),
                       layers.apply_rope(x, cos, sin))
    c = PagedKVCache(1, 2, 8, torch.float32, "cpu", num_blocks=4, block_size=4)
    c.grow(1, 6)
    slots = c.slot_list(1, 0, 6)
    c.write(0, torch.tensor(slots), torch.randn(6, 2, 8, generator=g), torch.randn(6, 2, 8, generator=g))
    q = torch.randn(2, 6, 8, generator=g)[:, :4]  # rows of a wider q/k tensor, as in a block
    for window in (None, 6):
        seg = attention.Segment(1, 2, 5, torch.tensor(slots), first=slots[0])  # q's row 1
        batch = attention.PassBatch(c, torch.tensor(slots[5:]), segments=[
            attention.Segment(0, 1, 5, torch.tensor(slots), first=slots[0])])
        ks, vs = c.span(0, slots[0], 6)
        want = attention.attention(q[1:2].transpose(0, 1), ks, vs, 5, scale=0.3, window=window)
        got = attention._decode_span(c, 0, q, seg, 0.3)
        assert torch.equal(got, want)
        k_new, v_new = ks[:, 5].clone()[None], vs[:, 5].clone()[None]  # rewrites the same values
        assert torch.equal(attention.attend(batch, 0, q[1:2], k_new, v_new, 0.3, window), want)


def test_a_batched_decode_equals_each_sequence_alone(tiny):
    """One decode pass for three sequences of different lengths (block tables of different
    widths, padded) against each decoded in a batch of its own, past block boundaries."""
    meta, w = tiny
    batched = Runner(meta.params, "cpu", torch.float32, kv_tokens=256)
    alone = Runner(meta.params, "cpu", torch.float32, kv_tokens=256)
    run_pass(batched, meta, w, list(enumerate(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        run_pass(alone, meta, w, [(i, p)])
    toks = [3, 4, 5]
    for _ in range(20):
        lg = run_pass(batched, meta, w, [(i, [t]) for i, t in enumerate(toks)])
        for i, t in enumerate(toks):
            assert rel_err(lg[i], run_pass(alone, meta, w, [(i, [t])])[0]) < 1e-5
        toks = [int(x) for x in lg.argmax(-1)]
    assert [batched.seq_len(i) for i in range(3)] == [len(p) + 20 for p in PROMPTS]


def test_a_full_cache_is_a_clear_error_and_leaks_nothing(tiny):
    meta, w = tiny
    r = Runner(meta.params, "cpu", torch.float32, kv_tokens=32)  # 2 blocks of 16
    run_pass(r, meta, w, [(0, list(range(1, 17)))])
    with pytest.raises(KVCacheFull, match="sequence 1"):
        r.start_pass([(0, [1]), (1, list(range(1, 20)))])
    assert r.sequences == {0} and r.cache.free_blocks == 0  # 0 grew into the last block
    r.release(0)
    assert r.cache.free_blocks == 2


def test_pinned_units_form_runs(tiny):
    """The graphs' units: each run of consecutive pinned units, recomputed after a pin."""
    meta, w = tiny
    r = Runner(meta.params, "cpu", torch.float32, kv_tokens=64)
    for u in (0, 1, 3):
        r.pin(u, w[meta.units[u].name])
    assert r.pinned_runs() == {0: (0, 1), 3: (3, 3)}
    r.pin(2, w[meta.units[2].name])
    assert r.pinned_runs() == {0: (0, 3)}


@pytest.mark.gpu
@pytest.mark.parametrize("streamed", [False, True], ids=["all-pinned", "streamed-between"])
def test_cuda_graphs_give_the_eager_tokens(tiny, streamed):
    """Three sequences (the bucket of 4: one padding row) decoded with graphs and without, in
    float32 on CUDA so that the two orders of the same kernels agree; with `streamed`, block 1 is
    not pinned, so two graph runs surround an eager unit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    meta, _ = tiny
    w = resident_weights(meta, "cuda")
    outs = []
    for graphs in (False, True):
        r = Runner(meta.params, "cuda", torch.float32, kv_tokens=512, cuda_graphs=graphs)
        for u in meta.units:
            if not (streamed and u.name == "block.1"):
                r.pin(u.index, w[u.name])
        toks, logits = greedy_runner(r, meta, w, PROMPTS, 24)
        outs.append((toks, logits))
        if graphs:
            assert r.graphs._graphs, "no graph was captured"
            assert {k[2] for k in r.graphs._graphs} == {4}  # 3 sequences: the bucket of 4
            assert len({k[:2] for k in r.graphs._graphs}) == (2 if streamed else 1)
    (eager, le), (graphed, lg) = outs
    assert graphed == eager
    for a, b in zip(le, lg):
        assert rel_err(a, b) < 1e-4
