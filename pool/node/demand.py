"""How many copies a warm pool keeps ready: a target that follows the arrival rate of spawns and the
time a refill takes, between the pool's floor (min_warm) and its ceiling; and the node's memory
budget, which caps the warm copies of all its templates together.

Pure logic on a clock the caller gives (tests/unit/test_demand.py drives it with a fake one).

Sizing (Little's law, a base-stock policy). A copy handed out is replaced by a refill that takes R
seconds; the spawns that arrive meanwhile find a copy only if one is ready. At a rate of λ spawns/s
they number m = λR on average, Poisson-distributed for independent clients; the demand target is
the smallest k with P(Poisson(m) > k) <= STOCKOUT (5 %): a refill cycle runs dry at most one time
in twenty. The margin above m is about 1.6√m for large m, more than m itself for small m (one spawn per
refill needs 3 copies), and 0 when m < 0.05, so an idle pool returns to its floor exactly.

Rate. An exponentially weighted rate rises with each spawn by ln2/RISE_HALF_LIFE_S (so it tracks a
burst within a second or two) and, once spawns stop, falls with FALL_HALF_LIFE_S (30 s): a pause
between bursts keeps the copies ready, a quiet minute returns most of them (1/4 of the peak after
60 s, under 2 % after 3 min).

Refill time. Measured by the pool from a refill's start to its copy being warm (queueing for a
restore thread included: it is how long a spawn would wait for that copy), smoothed per sample
(REFILL_WEIGHT). Until the first sample, PRIOR_REFILL_S. A refill that gets slower (a busy node)
raises the target; when spawns outrun what refills can supply, the target climbs to its caps.

Memory budget. The node's `memory_budget` (bytes, or None: no budget) is shared by its pools: each
template's copy costs its build's measured memory (rss_bytes, else image_bytes). Every pool's floor
is reserved first; a pool gets copies above its floor from what is left after the floors and the
other pools' current extras (first come, first served; released as demand decays).
"""
from __future__ import annotations

import math
from typing import Callable

RISE_HALF_LIFE_S = 1.0
FALL_HALF_LIFE_S = 30.0
STOCKOUT = 0.05
REFILL_WEIGHT = 0.3
PRIOR_REFILL_S = 0.2
_LN2 = math.log(2)


def copies_for(expected: float, limit: int, stockout: float = STOCKOUT) -> int:
    """The smallest k <= limit with P(Poisson(expected) > k) <= stockout."""
    if expected <= 0 or limit <= 0:
        return 0
    if expected > 500:  # e^-m underflows: the normal approximation is exact enough there
        return min(limit, math.ceil(expected + 1.645 * math.sqrt(expected)))
    k, p = 0, math.exp(-expected)
    cdf = p
    while cdf < 1 - stockout and k < limit:
        k += 1
        p *= expected / k
        cdf += p
    return k


class Demand:
    """One pool's demand: spawns seen (arrived) and refill times (refilled) -> copies wanted."""

    def __init__(self, clock: Callable[[], float], *, rise_half_life_s: float = RISE_HALF_LIFE_S,
                 fall_half_life_s: float = FALL_HALF_LIFE_S, stockout: float = STOCKOUT,
                 prior_refill_s: float = PRIOR_REFILL_S) -> None:
        self._clock = clock
        self._rise = rise_half_life_s
        self._fall = fall_half_life_s
        self._stockout = stockout
        self._fast = 0.0          # spawns/s, decaying with the rise half-life
        self._held = 0.0          # the rate held: at least the fast one, decaying with the fall one
        self._at = clock()        # when both were last brought up to date
        self._last = self._at     # the last spawn
        self.refill_s = prior_refill_s
        self._sampled = False

    def _decayed(self, now: float) -> tuple[float, float]:
        dt = max(0.0, now - self._at)
        return self._fast * 2 ** (-dt / self._rise), self._held * 2 ** (-dt / self._fall)

    def arrived(self) -> None:
        """One spawn asked for a copy (hit or miss)."""
        now = self._clock()
        fast, held = self._decayed(now)
        self._fast = fast + _LN2 / self._rise
        self._held = max(held, self._fast)
        self._at = self._last = max(self._at, now)

    def quiet_s(self) -> float:
        """Seconds since the last spawn (since the start if none came)."""
        return max(0.0, self._clock() - self._last)

    def refilled(self, seconds: float) -> None:
        """A refill took this long, from its start to its copy being ready."""
        if not self._sampled:
            self.refill_s, self._sampled = seconds, True
        else:
            self.refill_s += REFILL_WEIGHT * (seconds - self.refill_s)

    def rate(self) -> float:
        """Spawns per second, as held now. Reads only: a metrics scrape may call it from its own
        thread. (The held rate is never below the fast one: it rose with it and decays slower.)"""
        return self._decayed(self._clock())[1]

    def wanted(self, limit: int) -> int:
        """Copies to keep ready for the spawns expected within one refill time (at most limit)."""
        return copies_for(self.rate() * self.refill_s, limit, self._stockout)


class MemoryBudget:
    """The warm copies of all a node's pools within budget bytes (None: no budget)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self._copy_bytes: dict[str, int] = {}
        self._floor: dict[str, int] = {}
        self._extra: dict[str, int] = {}

    def set_copy_bytes(self, template: str, n: int | None) -> None:
        """What one copy of template costs (its build's measured memory; None: unknown)."""
        if n:
            self._copy_bytes[template] = n
        else:
            self._copy_bytes.pop(template, None)

    def forget(self, template: str) -> None:
        for d in (self._copy_bytes, self._floor, self._extra):
            d.pop(template, None)

    def cap(self, template: str, floor: int, want: int) -> int:
        """want copies of template ready, cut to what the budget leaves it (never below floor).
        Records what it granted: the other pools' caps count it until its next call."""
        self._floor[template] = floor
        cost = self._copy_bytes.get(template)
        if self.budget is None or cost is None or want <= floor:
            self._extra[template] = 0
            return want
        # list(): a metrics scrape may call this from its thread while the loop adds a pool
        costs = dict(self._copy_bytes)
        reserved = sum(f * costs.get(t, 0) for t, f in list(self._floor.items()))
        others = sum(e * costs.get(t, 0) for t, e in list(self._extra.items()) if t != template)
        extra = max(0, min(want - floor, (self.budget - reserved - others) // cost))
        self._extra[template] = extra
        return floor + extra

    def used(self) -> int:
        """Bytes the pools' targets hold now (floors and extras)."""
        return sum((self._floor.get(t, 0) + self._extra.get(t, 0)) * c
                   for t, c in list(self._copy_bytes.items()))
