"""Render benchmarks/bench_7b.py's results.json as the Markdown table of docs/BENCHMARKS.md.

    python3 benchmarks/table.py /tmp/gdsllm-bench/results.json
"""
from __future__ import annotations

import json
import sys

GB = 1e9


def _row(name, s_tok=None, gbps=None, cache=None, rss=None, note=""):
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    return f"| {name} | {f(s_tok, '.3f')} | {f(1 / s_tok if s_tok else None, '.2f')} | " \
           f"{f(gbps, '.2f')} | {f(cache / GB if cache is not None else None, '.2f')} | " \
           f"{f(rss / GB if rss is not None else None, '.2f')} | {note} |"


def render(res: dict) -> str:
    out = ["| run | s/token | tokens/s | streamed GB/s | page cache growth GB | peak RSS GB | note |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    c = res.get("ceiling")
    if c:
        others = ", ".join(f"{k} {v / GB:.2f}" for k, v in c.get("all", {}).items())
        out.append(_row(f"storage ceiling, cold ({c.get('reader', 'O_DIRECT')})",
                        gbps=c["bytes_per_s"] / GB,
                        note=f"{c['bytes'] / GB:.2f} GB read; GB/s of each reader: {others}"))
    for key, label in [("gdsllm_direct_cold", "GdsLLM direct, cold"),
                       ("gdsllm_buffered_warm", "GdsLLM buffered, page cache warm"),
                       ("gdsllm_resident", "GdsLLM everything resident")]:
        r = res.get(key)
        if r:
            rss = max(r["peak_rss"].values()) if r["peak_rss"] else None
            bound = ""
            if c and r["streamed_bytes_per_pass"]:
                bound = f"bound {r['streamed_bytes_per_pass'] / c['bytes_per_s']:.3f} s/token; "
            out.append(_row(f"{label} (budget {r['budget'] or 'all'})", r["s_per_token"],
                            r["streamed_GBps"] or None, r["cache_growth_bytes"], rss,
                            f"{bound}io {r['io_path']}, {r['resident_units']} units resident, "
                            f"model files in page cache after: "
                            f"{r.get('model_bytes_in_page_cache', 0) / GB:.2f} GB"))
    for key, label in [("airllm_cold", "AirLLM 4.0, cold"), ("airllm_warm", "AirLLM 4.0, warm"),
                       ("transformers", "transformers generate, all resident")]:
        r = res.get(key)
        if r:
            out.append(_row(label, r["s_per_token"], cache=r.get("cache_growth_bytes"),
                            rss=r.get("peak_rss_bytes")))
    t = res.get("ttft_512")
    if t:
        out.append(f"\nTime to first token, {t['prompt_tokens']}-token prompt: {t['ttft_s']:.2f} s")
    k = res.get("concurrent8")
    if k:
        out.append(f"Eight concurrent requests: {k['aggregate_tok_per_s']:.2f} tokens/s aggregate, "
                   f"{k['ratio']:.2f} x one request alone ({k['single_tok_per_s']:.2f} tokens/s)")
    if res.get("errors"):
        out.append(f"\nFailed parts: {res['errors']}")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))))
