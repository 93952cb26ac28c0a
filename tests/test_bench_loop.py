"""benchmarks/bench_loop.py's summary: each goal of issues 21 and 22 from the rows it needs, in
the right direction, and nothing for rows not measured. (The whole script is checked on the CPU
with `python3 benchmarks/bench_loop.py --quick`, about a minute: too long for the suite.)"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_loop import summarize  # noqa: E402


def resident(ms1: float, agg16: float, prefill_s: float | None = None) -> dict:
    row = {"batch1": {"ms_per_token": ms1, "aggregate_tok_per_s": 1e3 / ms1},
           "batch16": {"aggregate_tok_per_s": agg16}}
    if prefill_s is not None:
        row["prefill"] = {"first_token_s": prefill_s}
    return row


def test_summary_ratios_and_goals():
    rows = {"llm_resident_float16": resident(7.0, 2000.0, prefill_s=0.10),
            "serve_resident_float16": resident(8.4, 1400.0),  # 1.2x LLM: missed; 11.76x its b1: missed
            "llm_stream_float16": {"s_per_token": 5.0, "speed_over_bound": 0.95},
            "llm_resident_int4": resident(3.5, 2700.0, prefill_s=0.16),  # 1.35x float16's b16; prefill 1.6x
            "llm_stream_int4": {"s_per_token": 1.2}}
    s = summarize(rows, 16)
    assert abs(s["serve_b1_over_llm_b1_float16"]["value"] - 1.2) < 1e-9
    assert s["serve_b1_over_llm_b1_float16"]["met"] is False
    assert abs(s["serve_b16_over_b1_aggregate_float16"]["value"] - 1400.0 / (1e3 / 8.4)) < 1e-9
    assert s["serve_b16_over_b1_aggregate_float16"]["met"] is False
    assert s["llm_stream_float16_speed_over_bound"]["met"] is True
    assert s["int4_llm_b1_ms_per_token"]["met"] is True
    assert s["int4_over_float16_b16_aggregate_llm"]["met"] is True
    assert s["int4_over_float16_prefill"]["met"] is False
    assert s["llm_stream_float16_s_per_token"]["met"] is True  # 5.0 against 5.56 before
    assert s["llm_stream_int4_s_per_token"]["met"] is False  # 1.2 against 0.987 before
    assert "goal" not in s["llm_b16_over_b1_aggregate_float16"]  # a figure without a goal
    # rows not measured (int8, the service's int4): no entry, not a zero
    assert not any(k.startswith("int8") or k.endswith("_serve") or "int4_serve" in k for k in s)


def test_summary_quick_has_no_verdicts():
    s = summarize({"llm_resident_int4": resident(3.5, 2700.0)}, 16, goals_apply=False)
    assert s["int4_llm_b1_ms_per_token"] == {"value": 3.5, "issue": 22}
