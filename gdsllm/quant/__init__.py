"""Quantized weights: int4 and int8, group-wise, streamed as stored (see `schemes`)."""
