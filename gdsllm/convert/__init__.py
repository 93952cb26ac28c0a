"""Into the GdsLLM format: Hugging Face and GGUF converters, tokenizer extraction, synthetic models, the embedded default model."""
