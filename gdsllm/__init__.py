"""GdsLLM: run LLMs larger than VRAM by streaming weights from storage into the GPU."""
__version__ = "0.1.0"
