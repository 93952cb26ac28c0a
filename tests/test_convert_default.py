"""`gdsllm convert` on the command line (errors, success, Ctrl-C) and the embedded default model's
cache: converted once (across processes too), stale or tied-copy entries converted again, and
resolve_model's paths.

    python3 -m pytest tests/test_convert_default.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from conftest import concurrently
from convert_helpers import no_leftovers, write_gguf
from gdsllm.convert import default_model
from gdsllm.convert.synth import synth
from gdsllm.format.metadata import FormatError, load_model_meta

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType


def _cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdsllm", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


def test_cli_convert_errors_and_success(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    r, missing = concurrently(lambda: _cli("convert", tmp_path / "gpt2.gguf", tmp_path / "out"),
                              lambda: _cli("convert", tmp_path / "missing.gguf", tmp_path / "out"))
    assert r.returncode == 1 and "gpt2.gguf" in r.stderr and "architecture" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert missing.returncode == 1 and "missing.gguf" in missing.stderr
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []
    write_gguf(tmp_path / "ok.gguf", types={"attn_q": Q.Q8_0})
    r = _cli("convert", tmp_path / "ok.gguf", tmp_path / "out", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert load_model_meta(tmp_path / "out").dtype == "bfloat16"
    r = _cli("convert", tmp_path / "ok.gguf", tmp_path / "out")
    assert r.returncode == 1 and "already exists" in r.stderr


@pytest.mark.slow
def test_cli_convert_ctrl_c_leaves_nothing(tmp_path, smollm2_gguf):
    p = subprocess.Popen([sys.executable, "-m", "gdsllm", "convert", str(smollm2_gguf), str(tmp_path / "out"),
                          "--dtype", "float32"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(".tmp-" in n.name for n in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the writer's temp dir exists, i.e. conversion is under way
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err.decode()
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


# --- the default-model cache: lock, stale entries, resolve_model -----------------------------

@pytest.mark.slow
def test_default_model_converts_once_and_is_reused(smollm2_model, xdg_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg_cache))
    before = default_model.conversions
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_model.iterdir()}
    assert default_model.resolve_model(None) == smollm2_model
    assert default_model.default_model_dir() == smollm2_model
    assert default_model.conversions == before
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_model.iterdir()} == mtimes
    assert smollm2_model.parent == xdg_cache / "gdsllm" and no_leftovers(smollm2_model.parent) == []


def test_default_model_lock_converts_once_across_processes(tmp_path):
    write_gguf(tmp_path / "pkg.gguf", types={"attn_q": Q.Q4_1})
    code = ("import sys; from pathlib import Path; from gdsllm.convert import default_model as d; "
            f"d.default_gguf = lambda: Path({str(tmp_path / 'pkg.gguf')!r}); "
            "print(d.default_model_dir(progress=False), d.conversions)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o[0] for o in outs}) == 1 and sorted(int(o[1]) for o in outs) == [0, 0, 1]
    assert no_leftovers(tmp_path / "cache" / "gdsllm") == []


def test_default_model_stale_cache_is_reconverted(tmp_path, monkeypatch):
    write_gguf(tmp_path / "pkg.gguf")
    monkeypatch.setattr(default_model, "default_gguf", lambda: tmp_path / "pkg.gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = default_model.resolve_model(None, progress=False)
    n = default_model.conversions
    (first / "metadata.json").write_text("{}")  # e.g. an older format
    (first.parent / f".{first.name}.tmp-killed").mkdir()  # leftover of a killed conversion
    assert default_model.resolve_model(None, progress=False) == first
    assert default_model.conversions == n + 1
    load_model_meta(first)
    assert no_leftovers(first.parent) == []


def test_default_model_with_a_tied_copy_is_reconverted(tmp_path, monkeypatch):
    """A cached default model written when the head held a copy of the tied embedding still loads,
    but is converted again once, to store the table once."""
    from dataclasses import replace

    from gdsllm.convert.writer import ModelWriter
    from llama_ref import resident_weights
    write_gguf(tmp_path / "pkg.gguf", tied=True)
    monkeypatch.setattr(default_model, "default_gguf", lambda: tmp_path / "pkg.gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = default_model.resolve_model(None, progress=False)
    meta = load_model_meta(first)
    assert [t.name for t in meta.units[-1].tensors] == ["norm.weight"]
    w = resident_weights(meta)  # rewrite it as it was: untied with a copy, then marked tied
    with ModelWriter(first, replace(meta.params, tie_word_embeddings=False), meta.dtype,
                     overwrite=True) as mw:
        for u in meta.units:
            mw.add_unit({**w[u.name], **({"lm_head.weight": w["embed"]["embed_tokens.weight"]}
                                          if u.kind == "head" else {})})
    doc = json.loads((first / "metadata.json").read_text())
    doc["config"]["tie_word_embeddings"] = True
    (first / "metadata.json").write_text(json.dumps(doc))
    assert load_model_meta(first).units[-1].nbytes > meta.units[-1].nbytes  # loads, with the copy
    n = default_model.conversions
    assert default_model.resolve_model(None, progress=False) == first
    assert default_model.conversions == n + 1
    assert load_model_meta(first).units[-1].nbytes == meta.units[-1].nbytes
    assert default_model.resolve_model(None, progress=False) == first and default_model.conversions == n + 1


def test_resolve_model_paths(tmp_path):
    out = synth(tmp_path / "m", "tiny")
    assert default_model.resolve_model(str(out)) == out
    with pytest.raises(FileNotFoundError, match="nope"):
        default_model.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="gdsllm convert"):
        default_model.resolve_model(str(tmp_path / "x.gguf"))


def test_default_model_from_an_older_gdsllm_is_replaced(tmp_path, monkeypatch):
    """A cache entry converted by an older GdsLLM (before the "smollm" pre-tokenizer split digits
    first) is superseded: converted again under the current name, the old one removed."""
    write_gguf(tmp_path / "pkg.gguf")
    monkeypatch.setattr(default_model, "default_gguf", lambda: tmp_path / "pkg.gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    old = tmp_path / "cache" / "gdsllm" / "pkg-quantized"
    old.mkdir(parents=True)
    (old / "metadata.json").write_text("{}")
    new = default_model.resolve_model(None, progress=False)
    assert new.name == f"pkg-quantized-v{default_model.CACHE_VERSION}" and not old.exists()
    load_model_meta(new)
