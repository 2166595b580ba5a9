"""The invariance utility, checked against invariant and deliberately non-invariant functions."""

from __future__ import annotations

import numpy as np
import pytest

from quotient_models.invariance import (
    assert_invariant,
    default_rtol,
    invariance_report,
    relative_change,
)

x = np.random.default_rng(0).standard_normal((20, 3, 4)).astype(np.float32)
shifts = {f"roll{k}": (lambda a, k=k: np.roll(a, k, axis=-1)) for k in range(1, 4)}


def test_relative_change_is_zero_for_equal_and_scale_aware():
    a = np.ones((2, 3))
    assert np.all(relative_change(a, a) == 0)
    np.testing.assert_allclose(relative_change(a, 1.5 * a), [0.5, 0.5])


def test_invariant_function_passes():
    report = assert_invariant(lambda a: a.sum(axis=-1), x, shifts)
    assert report.max <= default_rtol(np.float32)


def test_non_invariant_function_fails_with_a_report():
    with pytest.raises(AssertionError, match="not invariant") as info:
        assert_invariant(lambda a: a[..., 0], x, shifts)
    assert "roll1" in str(info.value)


def test_report_per_transform_and_float64_accumulation():
    report = invariance_report(lambda a: a.reshape(len(a), -1), x, shifts)
    assert set(report.per_transform) == set(shifts)
    assert report.median > 0.1 and report.max >= report.p99 >= report.median


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        relative_change(np.ones((2, 3)), np.ones((2, 4)))
