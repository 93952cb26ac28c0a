"""Load against a running service: many concurrent clients, each in a bounded request loop.

    report = asyncio.run(run_load("tcp://127.0.0.1:5555", clients=64, duration_s=120))
    print(report.as_dict())   # completed, errors by code, hung, p50_s, p99_s, ...

Each client has its own DEALER socket (its own identity) and sends one request at a time until
the duration is over: random prompt, 1 to `max_tokens` new tokens, greedy or seeded sampling,
streamed or not. Every request must end with a Final (counted `completed`, its latency recorded)
or an error reply (counted by code); one with no reply for `request_timeout_s` counts as `hung`.
`benchmarks/load.py` is the command-line front end (docs/RELIABILITY.md).
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from gdsllm.service.client import AsyncClient, ServiceError

PROMPTS = ["hello world", "the quick brown fox", "once upon a time there was", "a b c d e f",
           "GdsLLM streams weights", "1 2 3 4 5 6 7 8 9", "zzz", "why is the sky blue"]


@dataclass
class LoadReport:
    clients: int
    duration_s: float = 0.0
    completed: int = 0
    hung: int = 0
    bad: int = 0  # a reply that is neither a proper Final nor an Error (must stay 0)
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]

    def as_dict(self) -> dict:
        return {"clients": self.clients, "duration_s": round(self.duration_s, 2),
                "completed": self.completed, "errors": dict(self.errors), "hung": self.hung,
                "bad": self.bad, "requests_per_s": round(self.completed / max(self.duration_s, 1e-9), 2),
                "p50_s": round(self.percentile(50), 4), "p99_s": round(self.percentile(99), 4)}


async def _one_client(endpoint: str, deadline: float, rng: random.Random, report: LoadReport,
                      prompts: list[str], max_tokens: int, request_timeout_s: float, server_key) -> None:
    async with AsyncClient(endpoint, timeout=request_timeout_s, server_key=server_key) as c:
        while time.monotonic() < deadline:
            params = dict(max_tokens=rng.randint(1, max_tokens), temperature=rng.choice([0.0, 0.8]),
                          seed=rng.randrange(1 << 30))
            prompt = rng.choice(prompts)
            t0 = time.monotonic()
            try:
                if rng.random() < 0.5:
                    final = await c.generate(prompt, **params)
                else:
                    final = None
                    async for msg in c.stream_messages(prompt, **params):
                        final = msg
            except ServiceError as e:
                report.errors[e.code] += 1
                continue
            except TimeoutError:
                report.hung += 1
                continue
            if getattr(final, "finish_reason", None) in ("stop", "length") and \
                    1 <= final.completion_tokens <= params["max_tokens"]:
                report.completed += 1
                report.latencies.append(time.monotonic() - t0)
            else:
                report.bad += 1


async def run_load(endpoint: str, clients: int = 64, duration_s: float = 120.0, *, seed: int = 0,
                   prompts: list[str] | None = None, max_tokens: int = 16,
                   request_timeout_s: float = 60.0, server_key=None) -> LoadReport:
    """Run `clients` concurrent client loops for `duration_s` seconds; returns the LoadReport."""
    report = LoadReport(clients)
    start = time.monotonic()
    deadline = start + duration_s
    await asyncio.gather(*[_one_client(endpoint, deadline, random.Random(seed * 1000 + i), report,
                                       prompts or PROMPTS, max_tokens, request_timeout_s, server_key)
                           for i in range(clients)])
    report.duration_s = time.monotonic() - start
    return report
