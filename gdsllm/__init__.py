"""GdsLLM: run LLMs larger than VRAM by streaming weights from storage into the GPU.

    from gdsllm import LLM, SamplingParams
    print(LLM().generate("Once upon a time", SamplingParams(max_tokens=32)).text)

    with gdsllm.Client("tcp://127.0.0.1:5555") as c:     # a running `gdsllm serve`
        print(c.generate("Once upon a time", max_tokens=32).text)

`LLM`, `SamplingParams` and the clients are imported lazily: `import gdsllm` stays cheap for the CLI.
"""
from gdsllm.version import __version__

__all__ = ["AsyncClient", "Client", "LLM", "Output", "SamplingParams", "ServiceError", "__version__"]


def __getattr__(name: str):
    if name in ("LLM", "Output"):
        from gdsllm.engine import llm
        return getattr(llm, name)
    if name in ("Client", "AsyncClient", "ServiceError"):
        from gdsllm.service import client
        return getattr(client, name)
    if name == "SamplingParams":
        from gdsllm.engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'gdsllm' has no attribute {name!r}")
