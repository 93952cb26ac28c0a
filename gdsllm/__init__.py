"""GdsLLM: run LLMs larger than VRAM by streaming weights from storage into the GPU.

    from gdsllm import LLM, SamplingParams
    print(LLM().generate("Once upon a time", SamplingParams(max_tokens=32)).text)

`LLM` and `SamplingParams` are imported lazily: `import gdsllm` stays cheap for the CLI.
"""
__version__ = "0.1.0"
__all__ = ["LLM", "Output", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "Output"):
        from . import llm
        return getattr(llm, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'gdsllm' has no attribute {name!r}")
