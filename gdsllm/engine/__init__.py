"""The engine core: tensor views over unit bytes, the batched runner, KV cache, sampling, tokenizer, sequence rules, residency planning, and the single-process `LLM`."""
