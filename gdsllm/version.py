"""The version of GdsLLM, in the one place every layer may read it."""
__version__ = "0.1.0"
