"""Sampling parameters and the per-request sampler: greedy, temperature, top-k, top-p, seed.

    params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=42)
    params.validate()                                   # ValueError with a clear message
    sampler = Sampler(params)                           # one per request: owns its generator
    token = sampler.sample(logits_row)                  # float logits [vocab], any device
    tokens = Sampler.sample_batch(logits, samplers)     # [B, vocab], each row its own sampler
    tokens, failed = Sampler.sample_rows(logits, samplers)  # the same; a row that fails is reported
    probs = sampler.probs(logits_rows)                  # [..., vocab]: the distribution sampled

`temperature == 0` is greedy (argmax). Otherwise, as transformers and vLLM do: logits are divided
by the temperature, then top-k, then top-p (nucleus) filter, then one draw from the softmax with
the request's own `torch.Generator` on the logits' device, so a seed gives the same tokens
whatever else shares the batch.

Float32 safety: the parameters are bounded to what float32 sampling represents (a temperature of
0 or within [FLOAT32_TINY, FLOAT32_MAX], a top_p of at least FLOAT32_TINY), the logits are shifted
so that their maximum is 0 before the temperature divides them (no overflow to inf, so no inf - inf
= NaN however small the temperature), and each row is drawn alone: a row that still has no valid
distribution (a model that produced NaN logits) fails only its own request (`sample_rows`).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 1.18e-38: the smallest normal float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.40e38


class SamplingError(ValueError):
    """A row of logits gave no distribution to draw from (NaN or inf logits)."""


MAX_DRAFT_TOKENS = 64  # speculative decoding: tokens drafted per sequence and pass, at most
MAX_DRAFT_TREE = 4096  # token-tree nodes per sequence and pass, at most (SpecExec verifies up to 2048-4096)
AUTO_TREE = "auto"  # --draft-tree auto: the tree's size from the measured pass costs


def check_draft_tokens(k) -> int:
    """The server's default K (--draft-tokens, LLM's draft_tokens): 1 to MAX_DRAFT_TOKENS, since a
    server with a draft drafts; a request may still ask for 0 (SamplingParams.draft_tokens)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ValueError(f"--draft-tokens must be 1 to {MAX_DRAFT_TOKENS}, got {k!r}")
    return k


def check_draft_tree(tree) -> int | str | None:
    """A --draft-tree / LLM draft_tree value: None or 0 (chains), 1 to MAX_DRAFT_TREE nodes, or
    "auto" (gdsllm.engine.adaptive_k.tree_size)."""
    if tree is None or tree == AUTO_TREE:
        return tree
    if isinstance(tree, str) and tree.isdigit():
        tree = int(tree)
    if isinstance(tree, bool) or not isinstance(tree, int) or not 0 <= tree <= MAX_DRAFT_TREE:
        raise ValueError(f"--draft-tree must be 0 to {MAX_DRAFT_TREE} or auto, got {tree!r}")
    return tree


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; defaults follow llama.cpp's.

    max_tokens: new tokens at most. temperature: 0 is greedy. top_p: nucleus mass in (0, 1],
    1 disables. top_k: keep the k most likely tokens, 0 disables. seed: None draws a random one.
    stop: strings that end the generation (not included in the text). stop_token_ids: token ids
    that end it, besides the model's end-of-sequence ids (unless ignore_eos). draft_tokens: how
    many tokens a draft model may propose per pass for this request (speculative decoding; None:
    the engine's default, 0: none); it changes speed, never the output distribution.
    draft_tree: nodes of the token tree a draft may propose per pass (None: the engine's
    default, 0: a chain of draft_tokens; gdsllm.engine.tree), at most draft_tokens deep.
    """

    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    draft_tokens: int | None = None
    draft_tree: int | None = None

    def __post_init__(self):
        # Accept lists (JSON, msgpack) and a lone string, store tuples: the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first bad field; return self."""
        def num(name, v, kind=(int, float)):
            if isinstance(v, bool) or not isinstance(v, kind):
                raise ValueError(f"{name} must be a number, got {v!r}")

        num("max_tokens", self.max_tokens, int)
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        num("temperature", self.temperature)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.temperature != 0 and not FLOAT32_TINY <= self.temperature <= FLOAT32_MAX:
            raise ValueError(f"temperature must be 0 (greedy) or from {FLOAT32_TINY:.3g} to "
                             f"{FLOAT32_MAX:.3g} (what float32 sampling represents), got "
                             f"{self.temperature}")
        num("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_p < FLOAT32_TINY:
            raise ValueError(f"top_p must be at least {FLOAT32_TINY:.3g} (what float32 sampling "
                             f"represents), got {self.top_p}")
        num("top_k", self.top_k, int)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None:
            num("seed", self.seed, int)
            if not 0 <= self.seed < 2**63:
                raise ValueError(f"seed must be in [0, 2^63), got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            num("stop_token_ids entries", t, int)
            if t < 0:
                raise ValueError(f"stop_token_ids must be token ids (>= 0), got {t}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.draft_tokens is not None:
            num("draft_tokens", self.draft_tokens, int)
            if not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
                raise ValueError(f"draft_tokens must be 0 to {MAX_DRAFT_TOKENS}, got {self.draft_tokens}")
        if self.draft_tree is not None:
            num("draft_tree", self.draft_tree, int)
            if not 0 <= self.draft_tree <= MAX_DRAFT_TREE:
                raise ValueError(f"draft_tree must be 0 to {MAX_DRAFT_TREE}, got {self.draft_tree}")
        return self


class Sampler:
    """Picks the next token of ONE request; its generator is seeded once, on first use."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None

    def rng(self, device: torch.device) -> torch.Generator:
        """This request's seeded generator on `device` (made on first use)."""
        if self.generator is None or self.generator.device != device:
            assert self.generator is None, "a request's logits moved to another device"
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def sample(self, logits: torch.Tensor) -> int:
        """One token id from float logits [vocab] (any device)."""
        assert logits.dim() == 1, logits.shape
        if self.params.greedy:
            return int(logits.argmax())
        return self.draw(self.probs(logits))

    def draw(self, probs: torch.Tensor) -> int:
        """One token id drawn from `probs` [vocab] with this request's generator."""
        return int(torch.multinomial(probs, 1, generator=self.rng(probs.device)))

    def uniform(self, device: torch.device) -> float:
        """One draw from U[0, 1) with this request's generator (speculative acceptance)."""
        return float(torch.rand(1, generator=self.rng(torch.device(device)), device=device))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution `sample` draws from, for float logits [..., vocab] (each row alone):
        temperature, then top-k, then top-p. Not for greedy parameters. The logits are shifted
        to a maximum of 0 first (the softmax is unchanged), so dividing by the smallest valid
        temperature gives -inf at worst, never inf."""
        p = self.params
        assert not p.greedy, "greedy sampling has no distribution"
        x = logits.float()
        x = (x - x.amax(dim=-1, keepdim=True)) / p.temperature
        vocab = x.shape[-1]
        if 0 < p.top_k < vocab:
            kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, -math.inf)
        if p.top_p < 1:
            # Sort once; keep the smallest prefix whose mass reaches top_p (always the first).
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            mass_before = torch.cumsum(probs, dim=-1) - probs
            sorted_x = sorted_x.masked_fill(mass_before >= p.top_p, -math.inf)
            x = torch.full_like(x, -math.inf).scatter(-1, order, sorted_x)
        return torch.softmax(x, dim=-1)

    @staticmethod
    def sample_batch(logits: torch.Tensor, samplers: list["Sampler"]) -> list[int]:
        """Row i of float logits [B, vocab] sampled by samplers[i] (see sample_rows); a row that
        cannot be sampled raises SamplingError."""
        tokens, failed = Sampler.sample_rows(logits, samplers)
        if failed:
            raise SamplingError(next(iter(failed.values())))
        return tokens

    @staticmethod
    def sample_rows(logits: torch.Tensor, samplers: list["Sampler"]) -> tuple[list[int], dict[int, str]]:
        """Row i of float logits [B, vocab] sampled by samplers[i]: (tokens, {row: why} for the
        rows that had no valid distribution; their token is -1). One device sync for the whole
        batch: one argmax over the greedy rows, each other row drawn on the device with its own
        generator (the same draws as `sample`), all read back together. A row without a valid
        distribution (NaN or inf) is drawn from a stand-in, its token discarded: its generator
        advances as usual and no other row is touched."""
        assert logits.dim() == 2 and logits.shape[0] == len(samplers), (logits.shape, len(samplers))
        greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
        picks, drawn = [], []
        if greedy:
            g = logits if len(greedy) == len(samplers) else logits[greedy]
            picks.append(g.argmax(-1))
        for i, s in enumerate(samplers):
            if not s.params.greedy:
                probs = s.probs(logits[i])
                ok = torch.isfinite(probs).all() & (probs.sum() > 0)
                probs = torch.where(ok, probs, torch.ones_like(probs))  # never NaN into multinomial
                drawn.append(i)
                picks.append(torch.multinomial(probs, 1, generator=s.rng(logits.device)))
                picks.append(ok.reshape(1).long())
        out: list[int] = [0] * len(samplers)
        flat = torch.cat(picks).tolist() if picks else []
        n = len(greedy)
        for i, t in zip(greedy, flat[:n]):
            out[i] = t
        failed: dict[int, str] = {}
        for j, i in enumerate(drawn):
            t, ok = flat[n + 2 * j], flat[n + 2 * j + 1]
            out[i] = t if ok else -1
            if not ok:
                failed[i] = "sampling failed: the model's logits for this request are not finite"
        return out, failed
