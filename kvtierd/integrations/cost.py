"""Load or recompute? A small online cost model that keeps cache hits from making things slower.

For a prompt of L tokens whose first P are cached, the two ways to the first
token are

    recompute:  forward(L tokens, empty cache)
    reuse:      load(P tokens' blocks) + forward(L - P tokens, after a loaded prefix)

and a hit is worth serving when reuse is the shorter. Each forward kind is
learned as a line `seconds = fixed + per_token * tokens` by exponentially
weighted least squares over the forwards observed (they have different
lengths, which is what lets a slope be fitted). Two lines, not one, because
their fixed costs differ: we measured (bench/README.md, reference ceilings) a 32-token forward after a
loaded prefix at ~30 ms in eager transformers on an H100, where a whole 2K
prefill took 17 ms; with one shared fixed cost the model would serve that
hit and double the time to first token. Until the forwards seen after a
load vary enough, that line borrows the recompute line's slope; until any
is seen, it is the recompute line. And the per-token cost is the marginal
one, not tokens / elapsed of one forward (a 32-token forward is mostly fixed
cost and would make recompute look ten times dearer than it is).

Load time is a per-request overhead plus, per block, bytes over the learned
rate of the tier it sits in (exponentially weighted averages of observed
bytes / second per tier). Where the prefix sits partly on slow tiers, the
best leading part is chosen (`plan`), because a chain is only usable from
its start.

Priors: prefill per-token cost from the model size (2 * params FLOPs per
token at a conservative device rate), load rates well below the measured
ceilings (bench/README.md), so a cold estimate errs towards recomputing: a wrongly skipped hit
costs the recompute we would have done anyway, a wrongly taken one more.
A skipped hit is counted; `probe_every` (off by default) serves one in N
skipped hits anyway so an estimate spoilt by a cold first load can recover.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

# bytes/s, by destination device kind: a conservative fraction of the ceilings in bench/README.md
_LOAD_PRIORS = {
    "cpu": {"hbm": 2e9, "host": 4e9, "disk": 0.8e9, "remote": 0.2e9},
    "cuda": {"hbm": 200e9, "host": 10e9, "disk": 0.8e9, "remote": 0.2e9},
}
# "remote" (Redis/Valkey through the daemon, bench/remote.py): about 0.3-0.6 GB/s on a loaded 2-core loopback
# cluster; a 10-25 GbE network gives more, but a cold estimate should err towards recomputing.
# FLOP/s a prefill sustains, conservative: fp32 on a few CPU cores; bf16 on a datacentre GPU
_FLOPS_PRIORS = {"cpu": 2e10, "cuda": 2e14}
_REQUEST_OVERHEAD_S = 300e-6  # lookup + acquire + release round trips over the Unix socket


@dataclass
class _EwmaLine:
    """Exponentially weighted least-squares fit of y = a + b * x."""

    alpha: float
    mx: float = 0.0
    my: float = 0.0
    mxx: float = 0.0
    mxy: float = 0.0
    n: int = 0

    def add(self, x: float, y: float) -> None:
        a = max(self.alpha, 1.0 / (self.n + 1))  # plain average until the window fills
        self.mx += a * (x - self.mx)
        self.my += a * (y - self.my)
        self.mxx += a * (x * x - self.mxx)
        self.mxy += a * (x * y - self.mxy)
        self.n += 1

    def slope(self, min_rel_spread: float = 0.25) -> float | None:
        """The fitted slope, or None while the x values seen are too alike to fit one."""
        var = self.mxx - self.mx * self.mx
        if self.n < 3 or var <= (min_rel_spread * self.mx) ** 2:
            return None
        b = (self.mxy - self.mx * self.my) / var
        return b if b > 0 else None

    def intercept(self, slope: float) -> float:
        """The fixed cost that puts a line of this slope through the weighted mean (never negative)."""
        return max(self.my - slope * self.mx, 0.0) if self.n else 0.0


@dataclass
class Plan:
    """What to do with a cached prefix: load its first `load_blocks` blocks, recompute the rest."""

    load_blocks: int
    cached_blocks: int
    load_s: float          # estimated time to load `load_blocks`
    recompute_s: float     # estimated time to compute those tokens instead
    skipped: bool          # a hit was available but (part of) it is not worth loading
    probe: bool = False    # served despite the estimate, to refresh it


@dataclass
class CostModel:
    """Learns load rates per tier and the cost of forwards with and without a loaded prefix; decides which
    hits to serve. Thread-safe; one per model (the forward costs are the model's)."""

    device: str = "cpu"
    params: int = 0                 # model parameters, for the prefill prior
    alpha: float = 0.2              # EWMA weight of a new observation
    request_overhead_s: float = _REQUEST_OVERHEAD_S
    probe_every: int = 0            # 0: never serve a hit estimated slower than recomputing
    learn: bool = True              # False: keep the given rates (tests, benchmarks forcing a path)
    load_rates: dict[str, float] = field(default_factory=dict)   # bytes/s per tier
    prefill_token_s: float = 0.0    # prior marginal seconds per prefill token
    skipped_hits: int = 0
    skipped_tokens: int = 0
    served_hits: int = 0

    def __post_init__(self) -> None:
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {self.alpha}")
        rates = dict(_LOAD_PRIORS[kind])
        rates.update(self.load_rates)
        for tier, rate in rates.items():
            if not rate > 0:
                raise ValueError(f"load rate of tier {tier!r} must be positive, got {rate}")
        self.load_rates = rates
        if self.prefill_token_s <= 0:
            # 2 FLOPs per parameter per token; a tiny model still pays ~1 µs/token of overheads
            self.prefill_token_s = max(2.0 * max(self.params, 1) / _FLOPS_PRIORS[kind], 1e-6)
        self._cold = _EwmaLine(self.alpha)   # forwards over a whole prompt, empty cache
        self._warm = _EwmaLine(self.alpha)   # forwards after a loaded prefix
        self._lock = threading.Lock()
        self._since_probe = 0

    # ------------------------------------------------------------ estimates

    def seconds_per_token(self) -> float:
        """The marginal prefill cost per token: fitted when the data allow it, else the prior."""
        return self._lines()[0][1]

    def _lines(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((fixed, per_token) of a forward with an empty cache, (fixed, per_token) of one after a load)."""
        with self._lock:
            b0 = self._cold.slope()
            b0 = self.prefill_token_s if b0 is None else b0
            a0 = self._cold.intercept(b0)
            if self._warm.n == 0:
                return (a0, b0), (a0, b0)
            b1 = self._warm.slope()
            b1 = b0 if b1 is None else b1
            return (a0, b0), (self._warm.intercept(b1), b1)

    def load_seconds(self, block_tiers: Sequence[str], block_bytes: int) -> float:
        """Estimated time to load these blocks (request overhead included)."""
        if not block_tiers:
            return 0.0
        return self.request_overhead_s + sum(block_bytes / self._rate(t) for t in block_tiers)

    def _rate(self, tier: str) -> float:
        try:
            return self.load_rates[tier]
        except KeyError:
            raise ValueError(f"unknown tier {tier!r} (known: {', '.join(self.load_rates)})") from None

    def plan(self, block_tiers: Sequence[str], block_bytes: int, block_tokens: int,
             total_tokens: int | None = None) -> Plan:
        """Choose how many leading cached blocks to load so that the time saved is largest (maybe none).

        `block_tiers`: the tier of each leading cached block; `total_tokens`:
        the prompt's length (default: just past the cached blocks).
        """
        tiers = list(block_tiers)
        total = len(tiers) * block_tokens + 1 if total_tokens is None else total_tokens
        (a0, b0), (a1, b1) = self._lines()
        recompute = a0 + b0 * total
        best_k, best_gain, best_load = 0, 0.0, 0.0
        load = self.request_overhead_s
        for k, tier in enumerate(tiers, start=1):
            load += block_bytes / self._rate(tier)
            rest = max(total - k * block_tokens, 1)
            gain = recompute - (load + a1 + b1 * rest)
            if gain > best_gain:
                best_k, best_gain, best_load = k, gain, load
        skipped = best_k < len(tiers)
        plan = Plan(best_k, len(tiers), best_load, best_k * block_tokens * b0, skipped)
        with self._lock:
            if skipped and self.probe_every:
                self._since_probe += 1
                if self._since_probe >= self.probe_every:
                    self._since_probe = 0
                    full = self.load_seconds(tiers, block_bytes)
                    plan = Plan(len(tiers), len(tiers), full, len(tiers) * block_tokens * b0,
                                skipped=False, probe=True)
            if plan.skipped:
                self.skipped_hits += 1
                self.skipped_tokens += (len(tiers) - plan.load_blocks) * block_tokens
            if plan.load_blocks:
                self.served_hits += 1
        return plan

    # ----------------------------------------------------------- observations

    def observe_load(self, block_tiers: Sequence[str], block_bytes: int, seconds: float) -> None:
        """Fold one measured load into the per-tier rates.

        A load spanning tiers is split among them in proportion to what the
        current rates predict, so each tier's share is still learned.
        """
        if not self.learn or not block_tiers or not seconds > 0 or block_bytes <= 0:
            return
        transfer = max(seconds - self.request_overhead_s, seconds * 0.1)
        with self._lock:
            expected = {t: 0.0 for t in set(block_tiers)}
            counts = {t: 0 for t in expected}
            for t in block_tiers:
                expected[t] += block_bytes / self._rate(t)
                counts[t] += 1
            total = sum(expected.values())
            for t, exp_s in expected.items():
                share = transfer * exp_s / total
                observed = counts[t] * block_bytes / share
                if math.isfinite(observed) and observed > 0:
                    self.load_rates[t] += self.alpha * (observed - self.load_rates[t])

    def observe_prefill(self, tokens: int, seconds: float, cached_tokens: int = 0) -> None:
        """Fold one measured forward of `tokens` new tokens (after `cached_tokens` loaded ones) into its line."""
        if not self.learn or tokens <= 0 or not seconds > 0:
            return
        with self._lock:
            (self._warm if cached_tokens > 0 else self._cold).add(float(tokens), float(seconds))

    def snapshot(self) -> dict[str, float | int]:
        """Current estimates and counters, for stats and benchmarks."""
        out: dict[str, float | int] = {f"load_{t}_bytes_per_s": r for t, r in self.load_rates.items()}
        (a0, b0), (a1, b1) = self._lines()
        out.update(prefill_s_per_token=b0, prefill_fixed_s=a0, after_load_s_per_token=b1, after_load_fixed_s=a1)
        out.update(skipped_hits=self.skipped_hits, skipped_tokens=self.skipped_tokens,
                   served_hits=self.served_hits)
        return out
