"""Bootstrap confidence intervals, and paired bootstrap tests between two models.

Every figure lowbit reports is a ratio of sums over *units*: perplexity is
``exp(Σ NLL / Σ tokens)`` over blocks of tokens, KL ``Σ KL / Σ positions``, top-1
``100 · Σ agree / Σ positions``, a task accuracy ``Σ correct / items``. The bootstrap
(Efron 1979; Efron & Tibshirani 1993, ch. 13, percentile intervals) draws the units with
replacement and recomputes the ratio; the 2.5 and 97.5 percentiles of the draws bound the
95 % interval.

Tokens are not independent, so text is resampled in blocks of consecutive positions (the
block bootstrap of Künsch 1989): `lowbit.eval.metrics` keeps sums per block of
``BLOCK_TOKENS`` positions of each evaluation window. Task items are the units of a task.

Two models measured on the same units are compared by the *paired* bootstrap (Koehn 2004,
"Statistical significance tests for machine translation evaluation"): the same draw of
units for both, the difference of their figures per draw; when the 95 % interval of the
difference contains 0, the two are not distinguishable on this data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowbit.errors import LowbitError

DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Units:
    """Per-unit numerators and denominators of one figure: ``transform(Σ num / Σ den)``."""

    num: np.ndarray  # (U,)
    den: np.ndarray  # (U,)
    transform: str = "identity"  # "identity" | "exp" | "percent"

    @classmethod
    def of(cls, num: Sequence[float], den: Sequence[float] | None = None, transform: str = "identity") -> Units:
        n = np.asarray(num, dtype=np.float64)
        d = np.ones_like(n) if den is None else np.asarray(den, dtype=np.float64)
        if n.shape != d.shape or n.ndim != 1 or n.size == 0:
            raise LowbitError(f"a bootstrap needs as many numerators as denominators, at least one; got "
                              f"{n.shape} and {d.shape}.")
        if transform not in ("identity", "exp", "percent"):
            raise LowbitError(f"unknown transform {transform!r}.")
        return cls(n, d, transform)

    def apply(self, ratio: np.ndarray) -> np.ndarray:
        return np.exp(ratio) if self.transform == "exp" else 100 * ratio if self.transform == "percent" else ratio

    def value(self) -> float:
        return float(self.apply(np.asarray(self.num.sum() / self.den.sum())))

    def resampled(self, draws: np.ndarray) -> np.ndarray:
        """The figure on each draw of unit indices (D, U) -> (D,)."""
        return self.apply(self.num[draws].sum(axis=1) / self.den[draws].sum(axis=1))


@dataclass(frozen=True)
class Estimate:
    """A figure and its bootstrap interval."""

    value: float
    low: float
    high: float
    units: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "units": self.units}


def _draws(units: int, draws: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, units, size=(draws, units))  # (D, U)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def estimate(units: Units, draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> Estimate:
    """The figure with its percentile bootstrap interval."""
    values = units.resampled(_draws(units.num.size, draws, seed))
    return Estimate(units.value(), *_interval(values, level), units=int(units.num.size))


@dataclass(frozen=True)
class Difference:
    """``a − b`` of one figure of two models on the same units, and its paired bootstrap interval."""

    delta: float
    low: float
    high: float

    @property
    def distinguishable(self) -> bool:
        """False when the interval of the difference contains 0."""
        return not (self.low <= 0.0 <= self.high)

    def to_dict(self) -> dict[str, float | bool]:
        return {"delta": self.delta, "low": self.low, "high": self.high, "distinguishable": self.distinguishable}


def paired_difference(a: Units, b: Units, draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> Difference:
    """Paired bootstrap of ``a − b``: both figures recomputed on the same draws of the shared units."""
    if a.num.size != b.num.size or a.transform != b.transform:
        raise LowbitError(f"a paired comparison needs the same units on both sides; got {a.num.size} and "
                          f"{b.num.size}.")
    indices = _draws(a.num.size, draws, seed)
    values = a.resampled(indices) - b.resampled(indices)
    return Difference(a.value() - b.value(), *_interval(values, level))


def format_estimate(e: Estimate, digits: int = 3) -> str:
    """``12.345 [12.0, 12.7]``: the value and its interval, to ``digits`` significant decimals."""
    if not math.isfinite(e.value):
        return str(e.value)
    return f"{e.value:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"
