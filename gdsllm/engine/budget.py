"""The VRAM budget: sizes as users write them, and the one ledger every claim on device memory goes
through.

    parse_size("8GiB") -> 8589934592
"""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'8GiB' -> 8589934592, '500MB' -> 500000000, '4096' -> 4096 (bytes)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 500MB, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
