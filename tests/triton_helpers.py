"""Running a Triton kernel check under the interpreter on CPU, for tests of Triton kernels.

    @needs_triton
    def test_x():
        result = run_interpreted("paged_attention_cases.py")   # its last stdout line, as JSON

TRITON_INTERPRET must be set before triton is imported, so the check runs as a script (in
tests/) in a process of its own; it prints one JSON line last and exits 0 when all is well.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="needs triton (pip install triton==3.5.0; its interpreter runs on CPU)")


def run_interpreted(script: str, timeout: float = 300) -> dict:
    """Run tests/<script> with TRITON_INTERPRET=1 and the repository on PYTHONPATH; assert it
    exits 0 and return the JSON object of its last line of output."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS.parent),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(TESTS / script)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def numpy24_interpreter_fix() -> None:
    """triton 3.5's interpreter turns a 1-element array into an int with int(array), which
    numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172 after 3.5): dynamic
    loop bounds fail. Apply that fix (squeeze first) when the installed triton lacks it."""
    from triton.runtime import interpreter
    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_gdsllm_fixed", False):
        return

    def patched(tensor, *args, **kwargs):
        result = orig(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())
        return result

    patched._gdsllm_fixed = True
    interpreter._patch_lang_tensor = patched
