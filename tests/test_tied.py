"""A tied model (tie_word_embeddings) stores its embedding once: the head unit holds the final norm
alone and the runner multiplies by the embed unit's table. Smaller on disk, the same tokens as
transformers through gdsllm.LLM and the service (whose planner pins the embedding), and directories
written with a copy in the head still load and agree.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from gdsllm import LLM, SamplingParams
from gdsllm.config import ServiceConfig
from gdsllm.engine.planner import plan_for, shared_embedding
from gdsllm.engine.tokenizer import Tokenizer
from gdsllm.format.metadata import METADATA_FILE, FormatError, align_up, load_model_meta
from gdsllm.convert.writer import ModelWriter
from gdsllm.service.client import Client
from gdsllm.service.pipeline import LocalService
from llama_ref import greedy_reference, resident_weights, smollm2, synth_model
from service_helpers import Service

N = 10
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
PROMPTS = ["tied weights", [3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied random model (synth -> its Hugging Face twin -> convert_hf) and transformers' twin."""
    return synth_model(tmp_path_factory.mktemp("tied"), seed=5, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def with_copy(tied, tmp_path_factory):
    """The same model as GdsLLM wrote it before: the head unit holding a copy of the embedding
    (written untied, then marked tied in metadata.json, as those directories were)."""
    _, d = tied
    meta = load_model_meta(d)
    w = resident_weights(meta)
    dst = tmp_path_factory.mktemp("copy") / "m"
    with ModelWriter(dst, replace(meta.params, tie_word_embeddings=False), meta.dtype, chat_template=meta.chat_template) as mw:
        for u in meta.units:
            tensors = dict(w[u.name])
            if u.kind == "head":
                tensors["lm_head.weight"] = w["embed"]["embed_tokens.weight"]
            mw.add_unit(tensors)
        mw.add_file("tokenizer.json", d / meta.tokenizer_file, tokenizer=True)
    doc = json.loads((dst / METADATA_FILE).read_text())
    doc["config"]["tie_word_embeddings"] = True
    (dst / METADATA_FILE).write_text(json.dumps(doc))
    return dst


def test_stored_once_and_smaller_on_disk(tied, with_copy):
    meta, old = load_model_meta(tied[1]), load_model_meta(with_copy)
    assert [t.name for t in meta.units[-1].tensors] == ["norm.weight"] and meta.units[-1].nbytes == 4096
    table = meta.units[0].tensor("embed_tokens.weight").nbytes
    assert meta.total_bytes == old.total_bytes - align_up(table)
    disk = sum((tied[1] / u.file).stat().st_size for u in meta.units)
    assert disk == meta.total_bytes < sum((with_copy / u.file).stat().st_size for u in old.units)
    assert meta.num_params == old.num_params == sum(p.numel() for p in tied[0].parameters())
    assert shared_embedding(meta) and not shared_embedding(old)


def test_llm_matches_transformers_and_the_old_layout(tied, with_copy):
    hf, d = tied
    with LLM(str(d)) as m, LLM(str(with_copy)) as old:
        outs = m.generate(PROMPTS, GREEDY)
        for o in outs:
            assert o.token_ids == greedy_reference(hf, o.prompt_token_ids, N)
        assert [o.token_ids for o in old.generate(PROMPTS, GREEDY)] == [o.token_ids for o in outs]
    # streamed: everything but the embedding (pinned, whatever the budget: the head reads it)
    block = max(u.nbytes for u in m.meta.units[1:-1])
    with LLM(str(d), vram_budget=m.meta.units[0].nbytes + block, prefetch_window=1) as s:
        assert s.plan.resident_names == ["embed"] and len(s.plan.streamed) == len(s.meta.units) - 1
        assert [o.token_ids for o in s.generate(PROMPTS, GREEDY)] == [o.token_ids for o in outs]


def test_planner_pins_the_embedding_of_a_tied_model(tied, with_copy):
    meta = load_model_meta(tied[1])
    block = max(u.nbytes for u in meta.units[1:-1])
    plan = plan_for(meta, meta.units[0].nbytes + block, window=1)
    assert plan.resident_names == ["embed"]
    with pytest.raises(ValueError, match="too small.*embed stays resident"):
        plan_for(meta, 2 * block, window=2)  # enough to stream everything, not to pin the table
    # the old layout's head carries its own copy: nothing has to be pinned
    assert plan_for(load_model_meta(with_copy), 2 * max(u.nbytes for u in meta.units), 2).resident_offsets == {}


def test_service_streams_the_blocks_around_a_pinned_embedding(tied):
    hf, d = tied
    meta = load_model_meta(d)
    block = max(u.nbytes for u in meta.units[1:-1])
    with Service(d, vram_budget=meta.units[0].nbytes + 2 * block, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=60) as c:
        h = c.health()
        assert h.resident_units == ["embed"] and h.streamed_units == len(meta.units) - 1
        f = c.generate(PROMPTS[0], max_tokens=N, temperature=0, ignore_eos=True)
    assert f.token_ids == greedy_reference(hf, Tokenizer(meta).encode(PROMPTS[0]), N)
    with pytest.raises(ValueError, match="embed stays resident"):
        LocalService(ServiceConfig(model=d, vram_budget=2 * block, metrics_port=None)).start()


@pytest.mark.slow
def test_smollm2_head_holds_no_copy_and_the_service_matches_transformers():
    """The default model's 113 MB table is stored, read and pinned once; the service, its blocks
    streamed around the pinned embedding, gives transformers' greedy tokens."""
    hf, tok, d = smollm2()
    meta = load_model_meta(d)
    assert [t.name for t in meta.units[-1].tensors] == ["norm.weight"] and shared_embedding(meta)
    table = meta.units[0].nbytes
    assert table > 100e6 and meta.total_bytes < 5.5e8  # 651 MB with the copy
    block = max(u.nbytes for u in meta.units[1:-1])
    with Service(d, vram_budget=table + 4096 + 2 * block, prefetch_window=2) as s, \
            Client(s.endpoint, timeout=300) as c:
        assert c.health().resident_units == ["embed", "head"]
        f = c.generate("The capital of France is", max_tokens=8, temperature=0, ignore_eos=True)
    assert f.token_ids == greedy_reference(hf, tok("The capital of France is").input_ids, 8)


def test_old_layout_copy_is_still_validated(with_copy, tmp_path):
    """A copy in the head of a tied model is accepted, but only with the right shape."""
    d = tmp_path / "bad"
    shutil.copytree(with_copy, d)
    doc = json.loads((d / METADATA_FILE).read_text())
    t = doc["units"][-1]["tensors"][-1]
    assert t["name"] == "lm_head.weight"
    t["shape"] = t["shape"][::-1]  # as many bytes, the wrong shape
    (d / METADATA_FILE).write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="tensor lm_head.weight: shape"):
        load_model_meta(d)
