"""Measuring invariance: a library utility, used by tests, the model cards and the service.

Errors are accumulated in float64. A projection p is invariant under a set of transforms when
p(g·x) == p(x) for every g; ``invariance_report`` measures the relative change
‖p(g·x) − p(x)‖ / ‖p(x)‖ over a batch and ``assert_invariant`` turns it into a check with a
dtype-aware default tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "InvarianceReport",
    "assert_invariant",
    "default_rtol",
    "invariance_report",
    "relative_change",
]

Transform = Callable[[np.ndarray], np.ndarray]


def relative_change(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-row ‖a − b‖ / max(‖a‖, eps), in float64; a and b are [B, ...]."""
    a64 = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b64 = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a64.shape != b64.shape:
        raise ValueError(f"shapes differ: {a64.shape} vs {b64.shape}")
    num = np.linalg.norm(a64 - b64, axis=1)
    den = np.maximum(np.linalg.norm(a64, axis=1), eps)
    return num / den


@dataclass
class InvarianceReport:
    """Relative changes of f under each transform: summary over all of them and per transform."""

    median: float
    p99: float
    max: float
    per_transform: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [
            f"  {k:>12}: median {v['median']:.2e}  max {v['max']:.2e}"
            for k, v in self.per_transform.items()
        ]
        return f"median {self.median:.2e}, p99 {self.p99:.2e}, max {self.max:.2e}\n" + "\n".join(
            rows
        )


def invariance_report(
    fn: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    transforms: Mapping[str, Transform],
) -> InvarianceReport:
    """Apply fn to x and to every transform of x; summarise the relative changes."""
    base = np.asarray(fn(x))
    per: dict[str, dict[str, float]] = {}
    changes = []
    for name, transform in transforms.items():
        rel = relative_change(base, np.asarray(fn(transform(x))))
        changes.append(rel)
        per[name] = {"median": float(np.median(rel)), "max": float(rel.max())}
    every = np.concatenate(changes)
    return InvarianceReport(
        median=float(np.median(every)),
        p99=float(np.quantile(every, 0.99)),
        max=float(every.max()),
        per_transform=per,
    )


def default_rtol(dtype: np.dtype | type) -> float:
    """Tolerance for a computation carried out in ``dtype``: ~100 ulp at unit scale."""
    return float(100 * np.finfo(np.dtype(dtype)).eps) if np.dtype(dtype).kind == "f" else 0.0


def assert_invariant(
    fn: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    transforms: Mapping[str, Transform],
    rtol: float | None = None,
    statistic: str = "max",
) -> InvarianceReport:
    """Raise AssertionError when the chosen statistic ("max" or "median") of the relative change
    exceeds rtol (default: from fn's output dtype). Returns the report otherwise."""
    report = invariance_report(fn, x, transforms)
    tol = rtol if rtol is not None else default_rtol(np.asarray(fn(x[:1])).dtype)
    value = getattr(report, statistic)
    if value > tol:
        raise AssertionError(
            f"not invariant: {statistic} relative change {value:.3e} > {tol:.1e}\n{report}"
        )
    return report
