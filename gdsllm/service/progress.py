"""What the service shows while it works for seconds: the resident units loading at start-up, and
a long weight pass (a prefill) as it goes.

    bar = LoadProgress(units=12, nbytes=3 << 30)     # a tqdm bar on a TTY, else log lines
    bar.update(unit_bytes); ...; bar.close()
    watch = PassProgress()
    watch.unit_done(pass_id, units_done, units_total, lambda: prompt_tokens)  # logs if long
    watch.pass_done(pass_id)

Both write to stderr only (stdout belongs to the generated text) and say nothing for what takes
less than a couple of seconds.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("gdsllm.service.progress")
EVERY_S = 2.0  # seconds between two progress lines (and before the first one)


class LoadProgress:
    """Resident units loading: a tqdm bar when stderr is a terminal, otherwise a log line every
    EVERY_S seconds (log files and pipes get no control characters)."""

    def __init__(self, units: int, nbytes: int, stream=None):
        self.units, self.nbytes, self.done_units, self.done_bytes = units, nbytes, 0, 0
        self.t0 = self.last = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if units and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="loading resident units", file=stream, leave=False)

    def update(self, nbytes: int) -> None:
        self.done_units += 1
        self.done_bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self.last >= EVERY_S and self.done_units < self.units:
            self.last = now
            log.info("loading resident units: %d of %d (%.0f%% of %.2f GB)", self.done_units,
                     self.units, 100 * self.done_bytes / max(self.nbytes, 1), self.nbytes / 1e9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.units and self.done_units == self.units:
            s = time.monotonic() - self.t0
            log.info("loaded %d resident units (%.2f GB) in %.1f s", self.done_units,
                     self.done_bytes / 1e9, s)


class PassProgress:
    """Logs a weight pass that carries prompt tokens (a prefill) once it has run EVERY_S seconds,
    then every EVERY_S seconds, and its total time at the end."""

    def __init__(self):
        self.pass_id: int | None = None
        self.t0 = self.last = 0.0
        self.tokens = 0
        self.logged = False

    def unit_done(self, pass_id: int, done: int, total: int, prompt_tokens) -> None:
        """`prompt_tokens()`: the pass's prompt tokens, asked only when a line is due."""
        now = time.monotonic()
        if pass_id != self.pass_id:
            self.pass_id, self.t0, self.last, self.logged = pass_id, now, now, False
        if now - self.last >= EVERY_S:
            self.last, self.tokens = now, prompt_tokens()
            if self.tokens:
                self.logged = True
                log.info("prefill of %d prompt tokens: %d of %d units, %.1f s", self.tokens, done,
                         total, now - self.t0)

    def pass_done(self, pass_id: int) -> None:
        if pass_id == self.pass_id and self.logged:
            log.info("prefill of %d prompt tokens done in %.1f s", self.tokens,
                     time.monotonic() - self.t0)
        self.pass_id = None


class CountProgress:
    """Work counted in items of `tokens` tokens each (perplexity windows): a tqdm bar with the
    tokens/s when the stream is a terminal, nothing otherwise; `close()` returns the one-line
    summary ("N windows (T tokens) in S s, R tokens/s") for the caller to print."""

    def __init__(self, what: str, tokens: int, stream=None):
        self.what, self.tokens, self.done = what, tokens, 0
        self.t0 = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=None, unit=what, desc=what, file=stream, leave=False)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.done)
            self.bar.set_postfix_str(f"{self.rate(done):.0f} tokens/s", refresh=True)
        self.done = done

    def rate(self, done: int) -> float:
        return done * self.tokens / max(time.monotonic() - self.t0, 1e-9)

    def close(self) -> str:
        if self.bar is not None:
            self.bar.close()
        s = time.monotonic() - self.t0
        return (f"{self.done} {self.what}s ({self.done * self.tokens} tokens) in {s:.1f} s, "
                f"{self.rate(self.done):.1f} tokens/s")
