"""STS correlations against scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from biencoder.evaluation.sts import pearson, spearman, sts_metrics

stats = pytest.importorskip("scipy.stats")


def _cases():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 257):
        x = rng.standard_normal(n)
        yield x, 0.3 * x + rng.standard_normal(n)
        # Few distinct values: heavy ties, as with gold STS scores on a 0-5 half-point scale.
        yield rng.integers(0, 11, n) / 2, rng.integers(0, 4, n)
        yield rng.integers(0, 3, n), -(x.round(1))
    yield [1e8 + 1, 1e8 + 2, 1e8 + 4], [3.0, 1.0, 2.0]


# Small integer samples can come out constant; scipy then warns and returns NaN, as we do.
@pytest.mark.filterwarnings("ignore:An input array is constant")
@pytest.mark.parametrize(("x", "y"), list(_cases()))
def test_matches_scipy(x, y):
    expected_s = stats.spearmanr(x, y).statistic
    expected_p = stats.pearsonr(x, y).statistic
    assert spearman(x, y) == pytest.approx(expected_s, abs=1e-9, nan_ok=True)
    assert pearson(x, y) == pytest.approx(expected_p, abs=1e-9, nan_ok=True)
    expected = {"spearman": expected_s, "pearson": expected_p}
    assert sts_metrics(x, y) == pytest.approx(expected, abs=1e-9, nan_ok=True)


def test_hand_computed_ties():
    # Ranks of x: [1.5, 1.5, 3, 4]; of y: [1, 2, 3, 4].
    rx = np.array([1.5, 1.5, 3, 4]) - 2.5
    ry = np.array([1, 2, 3, 4]) - 2.5
    expected = rx @ ry / math.sqrt((rx @ rx) * (ry @ ry))
    assert spearman([0, 0, 1, 5], [1, 2, 3, 4]) == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == 1.0
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_constant_input_gives_nan():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([1, 2, 3], [2, 2, 2]))


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [([1, 2], [1, 2, 3], "same length"), ([1], [1], "at least 2"), ([1, np.nan], [1, 2], "finite")],
)
def test_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        sts_metrics(x, y)
