"""Round-indexed schedules: one mechanism for every value that changes across rounds.

A schedule is a short string from a recipe (``kavg.lr_schedule = "cosine:0.1"``) turned into a
function of the round (1-based). The server evaluates it while planning a round and sends the
value in the round plan, so sites never need to know the schedule, and a resumed run gets the
same value for the same round.

Spellings (``base`` is the configured value, ``R`` the run's ``num_rounds``, ``r`` the round)::

    constant                 base
    cosine[:floor]           floor*base + (1 - floor)*base * (1 + cos(pi (r-1)/(R-1))) / 2
    linear[:floor]           base decays linearly to floor*base at round R
    inverse[:power]          base / r**power           (diminishing step, K-AVG Theorem 2; power 0.5)
    step:every:factor        base * factor**floor((r-1)/every)
    grow-linear[:cap]        base * r, at most cap*base (growing batch, K-AVG Theorem 2)
    grow-geometric:f[:cap]   base * f**(r-1), at most cap*base

Any schedule can be preceded by a linear warm-up (``warmup_rounds``): round r <= W uses
``value(r) * r / (W + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "cosine", "linear", "inverse", "step", "grow-linear", "grow-geometric")


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule spelling (see the module docstring)."""

    kind: str
    args: tuple[float, ...] = ()

    def value(self, base: float, round_idx: int, num_rounds: int, warmup_rounds: int = 0) -> float:
        """The scheduled value at ``round_idx`` (1-based) of a run of ``num_rounds`` rounds."""
        if round_idx < 1:
            raise ValueError(f"schedules start at round 1, got {round_idx}")
        r, n = round_idx, max(num_rounds, 1)
        if self.kind == "constant":
            out = base
        elif self.kind == "cosine":
            floor = self.args[0] if self.args else 0.0
            t = 0.0 if n == 1 else min(r - 1, n - 1) / (n - 1)
            out = base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
        elif self.kind == "linear":
            floor = self.args[0] if self.args else 0.0
            t = 0.0 if n == 1 else min(r - 1, n - 1) / (n - 1)
            out = base * (1.0 - (1.0 - floor) * t)
        elif self.kind == "inverse":
            power = self.args[0] if self.args else 0.5
            out = base / r**power
        elif self.kind == "step":
            every, factor = self.args
            out = base * factor ** ((r - 1) // int(every))
        elif self.kind == "grow-linear":
            cap = self.args[0] if self.args else math.inf
            out = base * min(float(r), cap)
        elif self.kind == "grow-geometric":
            factor = self.args[0]
            cap = self.args[1] if len(self.args) > 1 else math.inf
            out = base * min(factor ** (r - 1), cap)
        else:  # pragma: no cover - parse() admits only the kinds above
            raise AssertionError(self.kind)
        if warmup_rounds and r <= warmup_rounds:
            out *= r / (warmup_rounds + 1)
        return out

    def int_value(self, base: int, round_idx: int, num_rounds: int, warmup_rounds: int = 0) -> int:
        """``value`` rounded to the nearest integer, at least 1 (batch sizes, step counts)."""
        return max(1, int(round(self.value(float(base), round_idx, num_rounds, warmup_rounds))))


def parse(spec: str, *, key: str = "schedule") -> Schedule:
    """Parse a schedule spelling; ``ValueError`` naming ``key`` when it is not one."""
    text = spec.strip()
    kind, _, rest = text.partition(":")
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"{key} = {spec!r}: unknown schedule {kind!r} (one of {', '.join(SCHEDULE_KINDS)})")
    try:
        args = tuple(float(a) for a in rest.split(":")) if rest else ()
    except ValueError as err:
        raise ValueError(f"{key} = {spec!r}: arguments must be numbers") from err
    if any(not math.isfinite(a) for a in args):
        raise ValueError(f"{key} = {spec!r}: arguments must be finite")
    arity = {
        "constant": (0, 0),
        "cosine": (0, 1),
        "linear": (0, 1),
        "inverse": (0, 1),
        "step": (2, 2),
        "grow-linear": (0, 1),
        "grow-geometric": (1, 2),
    }[kind]
    if not arity[0] <= len(args) <= arity[1]:
        raise ValueError(f"{key} = {spec!r}: {kind} takes {arity[0]} to {arity[1]} arguments")
    if kind in {"cosine", "linear"} and args and not 0.0 <= args[0] <= 1.0:
        raise ValueError(f"{key} = {spec!r}: the floor must be in [0, 1]")
    if kind == "inverse" and args and not 0.0 < args[0] <= 2.0:
        raise ValueError(f"{key} = {spec!r}: the power must be in (0, 2]")
    if kind == "step" and (args[0] < 1 or not args[0].is_integer() or not 0.0 < args[1]):
        raise ValueError(f"{key} = {spec!r}: step needs an integer period >= 1 and a factor > 0")
    if kind == "grow-linear" and args and args[0] < 1:
        raise ValueError(f"{key} = {spec!r}: the cap must be >= 1")
    if kind == "grow-geometric" and (args[0] < 1 or (len(args) > 1 and args[1] < 1)):
        raise ValueError(f"{key} = {spec!r}: the factor and the cap must be >= 1")
    return Schedule(kind, args)
