"""Quantized weights (issue 10) in the format: converted models (Hugging Face and GGUF) whose CPU
compute equals transformers on the dequantized weights, `--quant none` exact, `gdsllm info` and the
planner on quantized units, and bad inputs (unmapped GGUF types, group sizes, unknown
quantization in metadata.json).

    python3 -m pytest -q tests/test_quant_format.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from convert_helpers import read_model, write_gguf
from gdsllm.convert.gguf import convert_gguf
from gdsllm.convert.hf import convert_hf
from gdsllm.engine.llm import LLM
from gdsllm.engine.planner import plan_residency
from gdsllm.format.metadata import FormatError, load_model_meta, verify_unit
from gdsllm.quant.gguf_blocks import check_keepable
from gdsllm.quant.schemes import QuantWeight
from llama_ref import reference_logits, rel_err, resident_weights, synth_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(intermediate_size=192)  # tiny, with every input dimension a multiple of 64


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdsllm", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# --- format and compute -------------------------------------------------------------------------

def dequantized_state(meta) -> dict[str, torch.Tensor]:
    """Every weight of a GdsLLM model as the float values it stands for, by Hugging Face name."""
    out = {}
    for uname, ws in resident_weights(meta).items():
        u = next(u for u in meta.units if u.name == uname)
        for name, w in ws.items():
            prefix = f"model.layers.{u.layer}." if u.kind == "block" else \
                ("" if name == "lm_head.weight" else "model.")
            out[prefix + name] = w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()
    return out


@pytest.mark.parametrize("quant,g", [("int4", 32), ("int4", 64), ("int8", 32)])
def test_quantized_model_computes_its_dequantized_weights(tmp_path, quant, g):
    """convert_hf --quant: the quantized projections (embedding and head int8), 4 KiB-aligned and
    checksummed; our logits equal transformers' on the dequantized weights (cpu_exact: float32
    copies, float32 math), and stay close to the float model's. The default CPU path (packed int4
    with bfloat16 activations, float16 int8 copies: gdsllm.quant.kernels_cpu) stays within 1%
    of the largest logit: bfloat16 keeps 8 significant bits, 0.4% per rounding at worst."""
    hf, _ = synth_model(tmp_path, **SHAPE)
    d = convert_hf(tmp_path / "hf", tmp_path / quant, dtype="float32", quant=quant, group_size=g)
    meta = load_model_meta(d)
    doc = json.loads((d / "metadata.json").read_text())
    assert doc["format_version"] == 2
    for u in meta.units:
        verify_unit(meta, u, torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8))
        for t in u.tensors:
            want = quant if t.name.endswith("_proj.weight") else \
                ("int8" if t.name in ("embed_tokens.weight", "lm_head.weight") else None)
            assert (t.quant.qtype if t.quant else None) == want, t
            if t.quant:
                assert t.offset % 4096 == 0 and t.quant.scales_offset % 4096 == 0
                assert t.quant.group_size == g
    float_bytes = load_model_meta(convert_hf(tmp_path / "hf", tmp_path / "f", dtype="float32")).total_bytes
    assert meta.total_bytes < float_bytes
    ref = type(hf)(hf.config).eval()
    missing = ref.load_state_dict(dequantized_state(meta), strict=False)
    assert not missing.unexpected_keys
    ids = [1, 5, 9, 200, 3, 77, 411, 12]
    with LLM(str(d), cpu_exact=True) as m:
        ours = m.logits(ids)
    want = reference_logits(ref, ids)
    assert rel_err(ours, want) < 1e-4
    assert rel_err(ours, reference_logits(hf, ids)) < (0.2 if quant == "int4" else 0.02)
    with LLM(str(d)) as m:
        assert rel_err(m.logits(ids), want) < 1e-2


def test_quant_none_stays_exact(tmp_path):
    """`gdsllm convert --quant none`: the float path, every tensor equal to the source."""
    synth_model(tmp_path, **SHAPE)
    r = _cli("convert", tmp_path / "hf", tmp_path / "none", "--quant", "none", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    ours = read_model(tmp_path / "none")
    ref = read_model(tmp_path / "model")  # convert_hf before this options existed
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert all(t.quant is None for u in load_model_meta(tmp_path / "none").units for t in u.tensors)


def test_gguf_keeps_blocks_and_info_shows_qtypes(tmp_path):
    """A GGUF's Q4_0 / Q4_1 / Q8_0 tensors stay int4 / int8 by default; `gdsllm info` names each
    unit's qtype; the planner budgets units by their real (smaller) size."""
    src = tmp_path / "t.gguf"
    write_gguf(src, types={"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q4_0,
                           "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0,
                           "ffn_down": Q.Q4_1, "output": Q.Q8_0})
    r = _cli("convert", src, tmp_path / "q", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    meta = load_model_meta(tmp_path / "q")
    kinds = {t.name: t.dtype for t in meta.units[1].tensors}
    assert kinds["self_attn.q_proj.weight"] == "int4" and kinds["self_attn.o_proj.weight"] == "int8"
    assert kinds["input_layernorm.weight"] == "float32"
    info = _cli("info", "-m", tmp_path / "q").stdout
    assert "quantized: int4 (groups of 32), int8 (groups of 32)" in info
    assert any(line.startswith("block.0") and "int4+int8+float32" in line for line in info.splitlines())
    # The quantized values are the GGUF's: against the float conversion, to bfloat16 scale rounding.
    flt = read_model(convert_gguf(src, tmp_path / "f", dtype="float32"))
    deq = dequantized_state(meta)
    for k, v in flt.items():
        assert (deq[k] - v).abs().max() <= 0.01 * v.abs().max() + 1e-6, k
    fmeta = load_model_meta(tmp_path / "f")
    budget = sum(u.nbytes for u in meta.units) + 2 * max(u.nbytes for u in meta.units)
    assert len(plan_residency([u.name for u in meta.units], [u.nbytes for u in meta.units], budget, 2).streamed) == 0
    assert len(plan_residency([u.name for u in fmeta.units], [u.nbytes for u in fmeta.units], budget, 2).streamed) > 0


# --- bad input ----------------------------------------------------------------------------------

def test_gguf_type_without_mapping(tmp_path):
    """IQ4_NL has no int4/int8 mapping: one clear line naming tensor and type and suggesting
    --quant none; with --quant none it converts (dequantized, as transformers does)."""
    src = tmp_path / "iq.gguf"
    write_gguf(src, types={"ffn_up": Q.IQ4_NL})
    r = _cli("convert", src, tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "tensor blk.0.ffn_up.weight has type IQ4_NL" in r.stderr and "--quant none" in r.stderr
    assert not (tmp_path / "out").exists()
    assert _cli("convert", src, tmp_path / "out", "--quant", "none").returncode == 0
    for t in ("Q2_K", "IQ2_XS"):
        with pytest.raises(FormatError, match=f"tensor blk.3.attn_q.weight has type {t}.*--quant none"):
            check_keepable(src, "blk.3.attn_q.weight", t)


def test_group_size_must_divide(tmp_path):
    synth_model(tmp_path, **SHAPE)
    r = _cli("convert", tmp_path / "hf", tmp_path / "out", "--quant", "int4", "--group-size", "128")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "group size 128 does not divide the input dimension 64" in r.stderr
    assert "embed_tokens.weight" in r.stderr or "proj.weight" in r.stderr
    assert not (tmp_path / "out").exists()


def _edit_first_quant(d: Path, fn) -> None:
    doc = json.loads((d / "metadata.json").read_text())
    t = next(t for t in doc["units"][1]["tensors"] if t.get("quant"))
    fn(doc, t)
    (d / "metadata.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("case,expect", [
    ("qtype", "unsupported qtype 'int3'"),
    ("layout", "int4 layout 'tinygemm-int32-v9' is not one this GdsLLM reads"),
    ("version", "format_version 3, this GdsLLM reads 1, 2"),
    ("scales", "scales_nbytes 1 does not match"),
])
def test_reader_refuses_unknown_quantization(tmp_path, case, expect):
    synth_model(tmp_path, **SHAPE)
    d = convert_hf(tmp_path / "hf", tmp_path / "q", dtype="float32", quant="int4", group_size=32)
    edits = {"qtype": lambda doc, t: (t.update(dtype="int3"), t["quant"].update(qtype="int3")),
             "layout": lambda doc, t: t["quant"].update(layout="tinygemm-int32-v9"),
             "version": lambda doc, t: doc.update(format_version=3),
             "scales": lambda doc, t: t["quant"].update(scales_nbytes=1)}
    _edit_first_quant(d, edits[case])
    with pytest.raises(FormatError, match=expect.replace("(", r"\(")):
        load_model_meta(d)
    r = _cli("info", "-m", d)
    assert r.returncode == 1 and expect in r.stderr and "Traceback" not in r.stderr


def test_int4_layout_mismatch_is_refused(monkeypatch):
    """A torch that packs int4 differently from the stored layout: FormatError, no numbers."""
    from gdsllm.quant import int4pack, kernels_cuda
    monkeypatch.setattr(int4pack, "probe_torch_layout",
                        lambda device="cuda": "torch 9.9 packs int4 differently")
    with pytest.raises(FormatError, match="tinygemm-int32 layout, and torch 9.9 packs int4 differently"):
        kernels_cuda.check_int4_layout()


def test_version_1_models_still_load(tmp_path):
    synth_model(tmp_path, **SHAPE)
    doc = json.loads((tmp_path / "model" / "metadata.json").read_text())
    doc["format_version"] = 1
    (tmp_path / "model" / "metadata.json").write_text(json.dumps(doc))
    assert load_model_meta(tmp_path / "model").units


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True},
                                       {"qk_norm": True}])
def test_cpu_fused_projections_equal_separate_ones(tmp_path, overrides):
    """int4 q/k/v and gate/up held as one FusedInt4 each (gdsllm.engine.host_copies), with the
    rotary embedding of q and k done once over both: logits bit for bit those of the same copies
    with every projection its own PackedInt4, with biases and with per-head q/k norms."""
    from gdsllm.convert.synth import synth
    from gdsllm.models.layers import FUSED
    from gdsllm.quant.kernels_cpu import INT4_KERNEL, FusedInt4, PackedInt4
    if not INT4_KERNEL:
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu (2.5 and later)")
    d = synth(tmp_path / "m", "tiny", dtype="float16", quant="int4", group_size=32,
              overrides={"intermediate_size": 192, **overrides})
    ids = list(range(1, 40))
    with LLM(str(d)) as llm:
        fused = llm.logits(ids), llm.logits(ids[:1])
        copies = llm.runner.host_copies.copies
        n = 0
        for c in copies.values():
            for name, parts in FUSED.items():
                if name in c:
                    assert isinstance(c.pop(name), FusedInt4)
                    c.update({p: PackedInt4.of(c[p]) for p in parts})
                    n += 1
        assert n == 2 * llm.meta.params.num_hidden_layers
        apart = llm.logits(ids), llm.logits(ids[:1])
    assert torch.equal(fused[0], apart[0]) and torch.equal(fused[1], apart[1])


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_cpu_resident_copies_against_dequantizing_per_matmul(tmp_path, quant):
    """On the CPU, resident units run over copies made once (gdsllm.engine.host_copies.HostCopies):
    with cpu_exact float32 copies whose logits are bit for bit those of dequantizing per matmul
    (a budget nothing fits in); by default the packed forms of gdsllm.quant.kernels_cpu (int4
    repacked for torch's kernel, int8 as float16; int4 q/k/v and gate/up each one FusedInt4),
    counted at their own bytes, whose logits stay within 1% of the largest (bfloat16 / float16
    roundings), for one token as for a prompt."""
    from gdsllm.convert.synth import synth
    from gdsllm.models.layers import FUSED
    from gdsllm.quant.kernels_cpu import INT4_KERNEL, FusedInt4, HalfCopy, PackedInt4
    d = synth(tmp_path / "m", "tiny", dtype="float16", quant=quant, group_size=32,
              overrides={"intermediate_size": 192})  # a multiple of the group
    ids = list(range(1, 40))
    with LLM(str(d), cpu_exact=True) as llm:
        copies = llm.runner.host_copies
        first = llm.logits(ids)  # made here
        assert copies.copies and not copies.skipped and copies.nbytes > 0
        kept = [w for c in copies.copies.values() for w in c.values()]
        assert not any(isinstance(w, QuantWeight) for w in kept)
        assert all(w.dtype == torch.float32 for w in kept if w.is_floating_point())
        again = llm.logits(ids)  # over the copies
        one = llm.logits(ids[:1])
    with LLM(str(d)) as llm:
        llm.runner.host_copies.budget = 0
        views = llm.logits(ids)
        assert llm.runner.host_copies.skipped and not llm.runner.host_copies.copies
    assert torch.equal(first, again) and torch.equal(first, views)
    with LLM(str(d)) as llm:
        copies = llm.runner.host_copies
        fast = llm.logits(ids)
        parts = {n for ps in FUSED.values() for n in ps}  # fused: kept as the pinned views
        kept = [w for c in copies.copies.values() for k, w in c.items()
                if isinstance(w, QuantWeight) and not (k in parts and any(f in c for f in FUSED))]
        kind = PackedInt4 if quant == "int4" else HalfCopy
        assert kept and all(isinstance(w, (PackedInt4, HalfCopy)) for w in kept)
        assert any(isinstance(w, kind) for w in kept) or not INT4_KERNEL
        fused = [w for c in copies.copies.values() for w in c.values() if isinstance(w, FusedInt4)]
        assert len(fused) == (2 * llm.meta.params.num_hidden_layers if quant == "int4" and INT4_KERNEL else 0)
        made = 0  # the bytes the copies allocated: packed data, float16 copies, upcast norms
        for unit, c in copies.copies.items():
            for name, w in c.items():
                if isinstance(w, PackedInt4):
                    made += w.packed.nbytes
                elif isinstance(w, HalfCopy):
                    made += w.half.nbytes
                elif isinstance(w, FusedInt4):
                    made += w.packed.nbytes + w.scales.nbytes
                elif w is not llm.runner.pinned[unit][name]:
                    made += w.nbytes
        assert copies.nbytes == made > 0
        assert rel_err(fast, first) < 1e-2 and rel_err(llm.logits(ids[:1]), one) < 1e-2
