"""Tick lateness over a sliding window: quantiles to within a bin, exact maximum, late counts."""

from __future__ import annotations

import numpy as np

from townhall.stage.lateness import LatenessWindow


def test_quantiles_are_never_below_the_truth_and_at_most_a_bin_above() -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.exponential(0.002, 4000), rng.exponential(0.08, 300), [1.7, 0.0314]])
    rng.shuffle(values)
    window = LatenessWindow(size=len(values))
    for v in values:
        window.add(float(v))
    for q in (0.5, 0.9, 0.99):
        true = float(np.quantile(values, q, method="inverted_cdf"))
        got = window.quantile(q)
        width = 0.0001 if true < 0.05 else 0.001 if true < 1.0 else 0.01
        assert true <= got <= true + width + 1e-12, (q, true, got)
    assert window.quantile(1.0) == float(values.max())


def test_old_ticks_leave_the_window_but_stay_counted() -> None:
    window = LatenessWindow(size=100, thresholds=(0.01, 0.02))
    window.add(0.5)  # one stall ...
    for _ in range(99):
        window.add(0.001)
    assert window.quantile(1.0) == 0.5
    window.add(0.015)  # ... pushed out of the window by the 101st tick
    assert window.quantile(1.0) == 0.015
    assert window.quantile(0.5) <= 0.0011
    assert len(window) == 100 and window.total == 101
    assert window.late == {0.01: 2, 0.02: 1}  # lifetime counts: the stall is still there


def test_empty_and_early_ticks() -> None:
    window = LatenessWindow(size=10)
    assert window.quantile(0.99) == 0.0 and window.quantile(1.0) == 0.0
    window.add(-0.0003)  # a timer that fired a hair early counts as on time
    assert window.quantile(0.5) == 0.0 and window.late == {0.005: 0, 0.01: 0, 0.02: 0}
